"""Family-specific access to an attention module: head counts, query/key projections, output projection.

Presses need queries (SnapKV's window, Expected Attention's statistics, Compactor's chunks), pre-RoPE keys
and the per-head output projection (CriticalKV). Those live in differently named weights per family
(Llama/Mistral/Qwen2 ``q_proj``; Qwen3 adds ``q_norm``; GPT-NeoX fuses ``query_key_value`` and rotates
only part of each head). This module is the one place that knows those names, so presses stay generic.
It sits below both ``kvbench.presses`` and ``kvbench.compression`` (both import it; it imports neither).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

FUSED_QKV = ("gpt_neox",)


def model_type(module: nn.Module) -> str:
    return module.config.model_type


def head_dim(module: nn.Module) -> int:
    return getattr(module, "head_dim", None) or module.head_size


def num_heads(module: nn.Module) -> int:
    return module.config.num_attention_heads


def num_kv_heads(module: nn.Module) -> int:
    config = module.config
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _split_fused(module: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = hidden_states.shape
    qkv = module.query_key_value(hidden_states).view(b, n, -1, 3 * head_dim(module)).transpose(1, 2)
    return qkv.chunk(3, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, h, n, d] with cos/sin [b, n, r]; dims past r (partial rotary) pass through.

    ``x * cos + rotate_half(x) * sin`` (rotate-half layout, ``rotate_half(x) = (-x2, x1)``) to the bit, with the
    half-rotation's terms added into ``x * cos`` in place: the plain expression makes four tensors the size of
    ``x`` (a layer's whole context of queries when a press rotates them back), and writing and page-faulting those
    made it 5.5x slower on CPU (9.9 against 1.8 ms for 9 heads x 4k queries; 146 against 98 ms over a prefill)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    r = cos.shape[-1]
    half = r // 2
    rot = x[..., :r] * cos
    rot[..., :half].sub_(x[..., half:r] * sin[..., :half])  # rotate_half's first half is -x2
    rot[..., half:].add_(x[..., :half] * sin[..., half:])
    return torch.cat((rot, x[..., r:]), dim=-1) if r < x.shape[-1] else rot


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The inverse of ``apply_rope``: a rotation by -theta (cos even, sin odd).

    ``scale`` is the factor the tables carry on top of the rotation (``rope_scale``: YaRN's and LongRoPE's
    attention scaling); rotating back with the same tables would multiply by it twice more, so they are divided
    by its square. The dims past the rotary ones are never scaled, so the whole vector cannot be divided instead.
    """
    if scale != 1.0:
        cos, sin = cos / scale**2, sin / scale**2
    return apply_rope(x, cos, -sin)


def rope_scale(rotary: nn.Module) -> float:
    """The factor a rotary module multiplies its cos/sin tables by (``attention_scaling``): 1 for plain RoPE, Llama-3
    and dynamic NTK; above 1 for YaRN and LongRoPE, whose queries and keys both carry it into the attention logits."""
    scale = getattr(rotary, "attention_scaling", 1.0)
    return float(scale) if scale is not None else 1.0


def _project(module: nn.Module, hidden_states: torch.Tensor, which: str) -> torch.Tensor:
    """``which`` = "q" or "k": that projection, per head, with the q/k norm where the model has one."""
    if model_type(module) in FUSED_QKV:
        return _split_fused(module, hidden_states)["qk".index(which)]
    b, n, _ = hidden_states.shape
    x = getattr(module, f"{which}_proj")(hidden_states).view(b, n, -1, head_dim(module))
    norm = getattr(module, f"{which}_norm", None)
    return (norm(x) if norm is not None else x).transpose(1, 2)


def pre_rope_queries(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Queries before RoPE, [b, num_heads, n, head_dim]."""
    return _project(module, hidden_states, "q")


def pre_rope_keys(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Keys before RoPE, [b, kv_heads, n, head_dim]."""
    return _project(module, hidden_states, "k")


def queries(module: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Post-RoPE queries exactly as the attention module computes them, [b, num_heads, n, head_dim]."""
    return apply_rope(pre_rope_queries(module, hidden_states), cos, sin)


def output_projection(module: nn.Module) -> torch.Tensor:
    """The output projection weight, [hidden, num_heads * head_dim] (columns grouped by head)."""
    layer = module.dense if model_type(module) in FUSED_QKV else module.o_proj
    return layer.weight


def find_rotary_embedding(model: nn.Module) -> nn.Module:
    """The model's shared rotary-embedding module (``<base>.rotary_emb``), used to rotate future positions."""
    base = getattr(model, "base_model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        for name, child in model.named_modules():
            if name.endswith("rotary_emb"):
                return child
        raise ValueError(f"{type(model).__name__} has no rotary embedding module; kvbench needs a RoPE model")
    return rotary


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Every rotary-embedding module of the model (one shared one in current transformers)."""
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "rope_type")]


def batch_dependent_rope(model: nn.Module) -> str | None:
    """The RoPE type whose frequencies follow the largest position of the whole batch (dynamic NTK, LongRoPE), or
    None: with those, a context's rotations would depend on the longer contexts batched with it."""
    for module in rotary_modules(model):
        kinds = module.rope_type.values() if isinstance(module.rope_type, dict) else [module.rope_type]
        for kind in kinds:
            if "dynamic" in str(kind) or kind == "longrope":
                return str(kind)
    return None


class RotaryState:
    """The mutable state of rotary modules, to put back later: their buffers (values, in place, so the storage the
    model holds stays the same) and plain attributes (attributes added since are dropped).

    transformers' dynamic RoPE grows its frequencies to the longest position it has been asked for and keeps them
    (until a call shorter than the original length resets them), and LongRoPE caches its long factors: left alone,
    a window's numbers would depend on the windows and presses computed before it in the same process.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.saved = [(module,
                       {name: (tensor, tensor.clone()) for name, tensor in module._buffers.items() if tensor is not None},
                       {k: v for k, v in vars(module).items() if not k.startswith("_")})
                      for module in modules]

    @classmethod
    def of(cls, model: nn.Module) -> "RotaryState":
        return cls(rotary_modules(model))

    def restore(self) -> None:
        for module, buffers, plain in self.saved:
            for name, (tensor, saved) in buffers.items():
                current = module._buffers.get(name)
                if current is not None and current.device != tensor.device:  # the model moved since: move the values
                    module._buffers[name] = saved.to(current.device)
                    continue
                if current is not tensor:
                    module._buffers[name] = tensor
                tensor.copy_(saved)
            for key in [k for k in vars(module) if not k.startswith("_") and k not in plain]:
                delattr(module, key)
            vars(module).update(plain)


def fresh_rotary_state(model: nn.Module) -> RotaryState:
    """The rotary state the model had when kvbench first saw it (``kvbench.models`` asks right after loading):
    every prefill starts from it, so no computation depends on what the process ran before."""
    state = getattr(model, "_kvbench_fresh_rotary", None)
    if state is None:
        state = RotaryState.of(model)
        model._kvbench_fresh_rotary = state
    return state


CACHE_KWARGS = ("cache", "past_key_values", "layer_past")  # newer transformers say "cache"; older ones and GPT-NeoX the others


def cache_from_kwargs(kwargs: dict):
    """The cache an attention module was called with, whatever this transformers release names the argument."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_argument(model: nn.Module) -> str:
    """The keyword this model's forward takes its cache under: ``cache`` in newer transformers releases (which
    still accept ``past_key_values`` with a deprecation warning), ``past_key_values`` before. Asked once per
    model class: decoding asks it at every generated token."""
    return _cache_argument_of(type(model))


@functools.lru_cache(maxsize=None)
def _cache_argument_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
