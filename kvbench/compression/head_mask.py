"""Routing attention calls that read a head-adaptive cache layer, in every attention implementation.

- A ``PackedLayer`` (the default head-adaptive layout, and every layer of a batch of contexts): the call goes to
  ``kvbench.compression.packed_attention``, which attends to the packed per-head context and the dense tail.
- The masked layout (``CompressedLayer`` with a ``head_mask``: each head padded to a common length): the masks
  transformers builds are shared by all heads, so the call gets a ``[batch, heads, q, kv]`` additive mask
  instead. eager and sdpa take such a mask; flash-attention kernels cannot, so the call goes through sdpa.

A forward pre-hook on each attention module switches the implementation for that call and a post-hook
switches it back. The hooks are installed once per model and stay: the compressed cache outlives
``kvbench.compress``, and for ordinary caches the hook returns at its first check.
"""

from __future__ import annotations

import torch
from torch import nn

from kvbench import model_access
from kvbench.compression import packed_attention
from kvbench.compression.cache import CompressedLayer, PackedLayer, layer_of

MASKABLE = ("eager", "sdpa")
_FLAG = "_kvbench_head_mask_hooks"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and (hasattr(m, "o_proj") or hasattr(m, "dense"))
            and (hasattr(m, "q_proj") or hasattr(m, "query_key_value"))]


def per_head_mask(layer: CompressedLayer, q_len: int, incoming: torch.Tensor | None, n_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [b, n_heads, q, P + A + q]: per-head keep mask over the P compressed tokens, all A
    tokens appended since, causal over the q new ones."""
    head_mask = layer.head_mask
    b, kv_heads, n_compressed = head_mask.shape
    appended = layer.keys.shape[-2] - n_compressed
    device = head_mask.device
    compressed = head_mask.repeat_interleave(n_heads // kv_heads, dim=1)[:, :, None, :].expand(b, n_heads, q_len, n_compressed)
    earlier = torch.ones(b, n_heads, q_len, appended, dtype=torch.bool, device=device)
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril().expand(b, n_heads, q_len, q_len)
    allowed = torch.cat([compressed, earlier, causal], dim=-1)
    # The model builds one mask from layer 0's length; reuse it (padding) only where this layer agrees.
    if isinstance(incoming, torch.Tensor) and incoming.dim() == 4 and incoming.shape[-1] == allowed.shape[-1]:
        allowed = allowed & (incoming if incoming.dtype == torch.bool else incoming == 0)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def _route(module: nn.Module, implementation: str) -> None:
    module._kvbench_routed_from = module.config._attn_implementation
    module.config._attn_implementation_internal = implementation


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    layer = layer_of(model_access.cache_from_kwargs(kwargs), module.layer_idx)
    if isinstance(layer, PackedLayer):
        module._kvbench_packed_layer = layer
        _route(module, packed_attention.NAME)
        return None
    if not isinstance(layer, CompressedLayer) or layer.head_mask is None:
        return None
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    kwargs["attention_mask"] = per_head_mask(
        layer, hidden.shape[1], kwargs.get("attention_mask"), model_access.num_heads(module), hidden.dtype
    )
    if module.config._attn_implementation not in MASKABLE:
        _route(module, "sdpa")
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    routed_from = getattr(module, "_kvbench_routed_from", None)
    if routed_from is not None:
        module.config._attn_implementation_internal = routed_from
        module._kvbench_routed_from = None
    module._kvbench_packed_layer = None
    return output


def install(model: nn.Module) -> None:
    packed_attention.register()
    for module in attention_modules(model):
        if getattr(module, _FLAG, False):
            continue
        module.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        module.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
        setattr(module, _FLAG, True)
