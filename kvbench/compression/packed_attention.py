"""Attention over a ``PackedLayer``: the packed per-head context and the dense tail, merged by log-sum-exp.

Softmax attention over a union of key sets splits exactly: attend to each part alone, keep each part's output
``o_i`` and log-sum-exp ``l_i``, then ``o = sum_i exp(l_i - l) o_i`` with ``l = logsumexp_i l_i`` (the merge
flash-decoding uses across splits). The packed part is then attended once per call whatever each head keeps,
and tokens appended later never force a re-pack.

The packed part runs flash-attention's variable-length kernel when it is installed (2.6 or later) and the tensors are
fp16/bf16 on CUDA (each (sequence, KV head) is one variable-length sequence whose query rows are the head's GQA group).
Without it, on CUDA, plain PyTorch gathers a layer's packed block into a transient padded view (one kernel per
layer; only the stored cache shrinks, not this layer's working set). On the CPU each (sequence, KV head) is
attended through a view of its own slice of the packed block: nothing is copied or padded, and a decode step over
the packed cache costs what one over a dense cache of the same kept size costs (the gather was a quarter of a
step on SmolLM2 at 2k tokens).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from kvbench.compression.cache import PackedLayer

NAME = "kvbench_packed"


def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, H, q, d] -> [b, kv_heads, group * q, d]: the query rows each KV head serves."""
    b, n_heads, q_len, d = query.shape
    return query.reshape(b, kv_heads, (n_heads // kv_heads) * q_len, d)


def _softmax_parts(logits: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention returning (output, lse); rows with nothing allowed give output 0 and lse -inf."""
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return weights.to(values.dtype) @ values, lse


def _packed_part_torch(layer: PackedLayer, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, kv_heads = layer.lengths.shape
    longest = int(layer.lengths.max()) if layer.lengths.numel() else 0
    slots = torch.arange(longest, device=query.device)
    present = slots < layer.lengths[..., None]  # [b, kv, longest]
    index = torch.where(present, layer.offsets()[..., None] + slots, torch.zeros_like(slots))
    keys = layer.packed_keys[index].float()  # [b, kv, longest, d]
    values = layer.packed_values[index].float()
    q = _grouped(query.float(), kv_heads) * scaling
    out, lse = _softmax_parts(q @ keys.transpose(-1, -2), present[:, :, None, :], values)
    return out, lse


def _packed_part_segments(layer: PackedLayer, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One view of the packed block per (sequence, KV head): no gather and no padding (a loop of batch x KV heads
    small products per layer, cheap on the CPU, where the gather's copy dominated)."""
    b, kv_heads = layer.lengths.shape
    q = _grouped(query.float(), kv_heads) * scaling  # [b, kv, group * q, d]
    out = q.new_zeros(b, kv_heads, q.shape[2], layer.packed_values.shape[-1])
    lse = q.new_full(q.shape[:3], float("-inf"))
    for i, (starts, counts) in enumerate(zip(layer.offsets().tolist(), layer.lengths.tolist())):
        for h, (start, count) in enumerate(zip(starts, counts)):
            if count == 0:
                continue  # nothing kept: output 0, lse -inf (the tail alone answers)
            keys = layer.packed_keys[start : start + count].float()
            values = layer.packed_values[start : start + count].float()
            logits = q[i, h] @ keys.T
            lse[i, h] = torch.logsumexp(logits, dim=-1)
            out[i, h] = torch.exp(logits - lse[i, h, :, None]) @ values
    return out, lse


def _packed_part_flash(layer: PackedLayer, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn import flash_attn_varlen_func

    b, kv_heads = layer.lengths.shape
    _, n_heads, q_len, d = query.shape
    group = n_heads // kv_heads
    # One variable-length sequence per (sequence, KV head): q_len query rows with `group` heads each.
    q = query.view(b, kv_heads, group, q_len, d).permute(0, 1, 3, 2, 4).reshape(b * kv_heads * q_len, group, d)
    k = layer.packed_keys[:, None, :]
    v = layer.packed_values[:, None, :]
    cu_q = torch.arange(0, b * kv_heads + 1, device=query.device, dtype=torch.int32) * q_len
    cu_k = torch.nn.functional.pad(layer.lengths.flatten().cumsum(0), (1, 0)).to(torch.int32)
    out, lse, _ = flash_attn_varlen_func(q.contiguous(), k, v, cu_q, cu_k, q_len, int(layer.lengths.max()),
                                         softmax_scale=scaling, causal=False, return_attn_probs=True)
    # out [b*kv*q, group, d] -> [b, kv, group*q, d]; lse [group, b*kv*q] (flash-attn 2 varlen layout)
    out = out.view(b, kv_heads, q_len, group, d).permute(0, 1, 3, 2, 4).reshape(b, kv_heads, group * q_len, d)
    lse = lse.view(group, b, kv_heads, q_len).permute(1, 2, 0, 3).reshape(b, kv_heads, group * q_len)
    # flash-attn writes +inf as the log-sum-exp of a sequence without keys (a head that kept nothing); the merge
    # reads such a part as -inf (weight 0). One query row (decoding) makes the reshape a strided view: copy it.
    lse = lse.float().masked_fill(torch.isposinf(lse), float("-inf")).contiguous()
    return out.float().contiguous(), lse


# flash-attn 2.6 returns the varlen log-sum-exp as [heads, total_q]; earlier releases as [seqs, heads, max_q], the
# same number of elements, which the merge would read scrambled (no error, wrong attention).
FLASH_MIN_VERSION = (2, 6)


@functools.lru_cache(maxsize=1)
def flash_usable() -> bool:
    """flash-attn is installed in a release whose varlen outputs ``_packed_part_flash`` reads (asked once per
    process: every attention call of a decode step would otherwise parse the version again)."""
    from packaging.version import InvalidVersion, Version

    try:
        import flash_attn
    except ImportError:
        return False
    try:
        return Version(str(getattr(flash_attn, "__version__", ""))).release[:2] >= FLASH_MIN_VERSION
    except InvalidVersion:
        return False


def _use_flash(layer: PackedLayer, query: torch.Tensor) -> bool:
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    return flash_usable()


def _tail_part(layer: PackedLayer, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail ``[b, kv, T, d]`` (the current ``q`` tokens last): causal among the new tokens, padding hidden."""
    b, kv_heads, tail, _ = keys.shape
    q_len = query.shape[2]
    group = query.shape[1] // kv_heads
    row = torch.arange(q_len, device=query.device)[:, None] + (tail - q_len)
    allowed = torch.arange(tail, device=query.device)[None, :] <= row  # [q, T]
    allowed = allowed[None, None].expand(b, kv_heads, q_len, tail)
    if layer.tail_validity is not None:
        allowed = allowed & layer.tail_validity.valid[:, None, None, :tail]
    allowed = allowed[:, :, None].expand(b, kv_heads, group, q_len, tail).reshape(b, kv_heads, group * q_len, tail)
    q = _grouped(query.float(), kv_heads) * scaling
    return _softmax_parts(q @ keys.float().transpose(-1, -2), allowed, values.float())


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Combine two attention parts over disjoint keys into attention over their union."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(lse_a - finite)[..., None] * out_a + torch.exp(lse_b - finite)[..., None] * out_b


def packed_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """An attention function in transformers' interface; ``key``/``value`` are the layer's tail (what the cache
    update returned). The layer itself is handed over by ``kvbench.compression.head_mask``'s pre-hook."""
    layer: PackedLayer = module._kvbench_packed_layer
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    b, n_heads, q_len, _ = query.shape
    if _use_flash(layer, query):
        packed = _packed_part_flash
    else:
        packed = _packed_part_torch if query.is_cuda else _packed_part_segments
    out_a, lse_a = packed(layer, query, scaling)
    out_b, lse_b = _tail_part(layer, query, key, value, scaling)
    out = merge(out_a, lse_a, out_b, lse_b)  # [b, kv, group * q, d]
    out = out.reshape(b, n_heads, q_len, -1).transpose(1, 2).contiguous().to(query.dtype)
    return out, None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention_forward)
