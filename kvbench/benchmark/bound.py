"""The memory-bound floor of decoding: each new token reads every weight once and every kept KV pair once.

At batch 1 a decode step does about 2 FLOPs per weight byte read (bf16), far below what a GPU can compute per
byte it can load, so its time is bounded below by bytes read / memory bandwidth:

    t_step >= (W + (1 - r) * L * b_kv) / BW

W: weight bytes read per step (every parameter; the input embedding table only as the one row looked up,
unless it is tied to the output head, which reads it whole), L: context tokens (the question after them is not
compressed and adds its own tokens to the kept ones), r: compression ratio,
b_kv = 2 * layers * kv_heads * head_dim * bytes_per_element (keys and values of one token).
Compression can only remove the KV term, so its gain is capped at (W + L*b_kv) / (W + (1-r)*L*b_kv).
"""

from __future__ import annotations

import pandas as pd
import torch


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys + values of one token over all layers, as a dense cache stores them."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * dtype.itemsize


def weight_bytes_per_step(config, dtype: torch.dtype) -> int:
    """Weight bytes one decode step reads, counted on a meta-device copy of the model (no memory, no download)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    total = sum(p.numel() for p in model.parameters())  # tied weights appear once in parameters()
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:
        total -= embedding.numel() - embedding.shape[-1]  # an untied lookup reads one row
    return total * dtype.itemsize


def kept_tokens(context_length: int, ratio: float, question_tokens: int = 0) -> int:
    """Tokens the first decode step reads of a ``context_length``-token prompt whose last ``question_tokens`` are
    not compressed: what a press keeps of the rest (the rule of ``kvbench.presses.base.Press.n_kept``) plus those."""
    return int((context_length - question_tokens) * (1.0 - ratio)) + question_tokens


def bound_ms_per_token(weight_bytes: int, kv_bytes: int, bandwidth_gbps: float) -> float:
    """Lower bound on decode ms/token at ``bandwidth_gbps`` (GB/s, 1e9 bytes)."""
    return (weight_bytes + kv_bytes) / (bandwidth_gbps * 1e9) * 1e3


def bound_table(config, dtype: torch.dtype, context_lengths: list[int], ratios: list[float], bandwidth_gbps: float,
                question_tokens: int = 0) -> pd.DataFrame:
    """Computed (not measured) bytes per decode step and the ms/token floor, one row per (context, ratio); the
    last ``question_tokens`` of each context length are the uncompressed question, as in the speed benchmark."""
    weights = weight_bytes_per_step(config, dtype)
    per_token = kv_bytes_per_token(config, dtype)
    rows = []
    for length in context_lengths:
        for ratio in ratios:
            kv = kept_tokens(length, ratio, question_tokens) * per_token
            rows.append({
                "context_length": length,
                "ratio": ratio,
                "dtype": str(dtype).removeprefix("torch."),
                "weight_bytes": weights,
                "kept_kv_bytes": kv,
                "bytes_per_step": weights + kv,
                "bandwidth_gbps": bandwidth_gbps,
                "bound_ms_per_token": bound_ms_per_token(weights, kv, bandwidth_gbps),
            })
    return pd.DataFrame(rows)
