"""Tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(vocab_size=256, num_hidden_layers=2, max_position_embeddings=1024, eos_token_id=2, bos_token_id=1)

FAMILIES = {
    # GQA 2:1, head_dim 32
    "llama": lambda: LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, **COMMON)),
    # GQA 4:1
    "mistral": lambda: MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, sliding_window=None, **COMMON)),
    # MHA with q/k/v biases
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, **COMMON)),
    # q/k norms, head_dim 64 > hidden/heads (exercises Compactor's sketch)
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64, **COMMON)),
    # fused qkv, partial rotary, no GQA
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, partial_rotary_factor=0.25, **COMMON)),
}


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]().eval()
    model.set_attn_implementation(attn_implementation)
    return model
