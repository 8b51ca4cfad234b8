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


def _scaled_llama(rope: dict, max_position_embeddings: int = 1024) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_theta": 10000.0, **rope},
                         **{**COMMON, "max_position_embeddings": max_position_embeddings})
    return LlamaForCausalLM(config)


# Rotary variants whose tables are not a bare rotation (YaRN: cos/sin times its attention scaling) or whose
# frequencies change with the positions asked for (dynamic NTK, trained on 64 positions here). Not in FAMILIES:
# their own tests ask for them.
SCALED_ROPE = {
    "llama_yarn": lambda: _scaled_llama({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256),
    "llama_dynamic": lambda: _scaled_llama({"rope_type": "dynamic", "factor": 4.0}, 64),
}


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    model = {**FAMILIES, **SCALED_ROPE}[family]().eval()
    model.set_attn_implementation(attn_implementation)
    return model


def output_projection_module(kv_heads: int, group: int, head_dim: int, hidden: int, generator: torch.Generator,
                             column_scales: torch.Tensor | None = None) -> torch.nn.Module:
    """Just what CriticalKV reads of an attention module: the family name and a random output projection
    (``column_scales`` ``[hidden]`` scales its output columns, as uneven as a trained model's)."""
    module = torch.nn.Module()
    module.config = type("Config", (), {"model_type": "llama"})()
    module.o_proj = torch.nn.Linear(kv_heads * group * head_dim, hidden, bias=False)
    weight = torch.randn(hidden, kv_heads * group * head_dim, generator=generator)
    with torch.no_grad():
        module.o_proj.weight.copy_(weight if column_scales is None else weight * column_scales[:, None])
    return module
