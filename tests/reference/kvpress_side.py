"""Runs inside the throw-away kvpress venv (never imported by kvbench or its tests).

For every (press, ratio) it prefills the context with kvpress' press, records which (layer, head, token) pairs
the cache keeps, then the last-position logits of the question over that cache, exactly as kvpress' pipeline
asks a question (explicit position ids that continue after the context). Usage:

    python kvpress_side.py INPUTS.json OUT.npz
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from kvpress import (
    AdaKVPress,
    CompactorPress,
    CriticalAdaKVPress,
    CriticalKVPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KeyRerotationPress,
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import AutoModelForCausalLM, DynamicCache

# kvbench registry name -> kvpress construction (kvpress' own leaderboard settings).
PRESSES = {
    "knorm": lambda r: KnormPress(compression_ratio=r),
    "streaming_llm": lambda r: StreamingLLMPress(compression_ratio=r, n_sink=4),
    "snapkv": lambda r: SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5),
    "adakv_snapkv": lambda r: AdaKVPress(SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5)),
    "expected_attention": lambda r: AdaKVPress(ExpectedAttentionPress(compression_ratio=r, epsilon=1e-2)),
    "compactor": lambda r: CompactorPress(compression_ratio=r),
    "adakv_compactor": lambda r: AdaKVPress(CompactorPress(compression_ratio=r)),
    "critical_snapkv": lambda r: CriticalKVPress(SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5)),
    "critical_adakv_snapkv": lambda r: CriticalAdaKVPress(SnapKVPress(compression_ratio=r, window_size=64, kernel_size=5)),
    "critical_expected_attention": lambda r: CriticalKVPress(ExpectedAttentionPress(compression_ratio=r, use_vnorm=False)),
    "critical_adakv_expected_attention": lambda r: CriticalAdaKVPress(
        ExpectedAttentionPress(compression_ratio=r, use_vnorm=False)
    ),
    "pyramidkv": lambda r: PyramidKVPress(compression_ratio=r, window_size=64, kernel_size=5),
    "tova": lambda r: TOVAPress(compression_ratio=r),
    "keydiff": lambda r: KeyDiffPress(compression_ratio=r),
    "observed_attention": lambda r: ObservedAttentionPress(compression_ratio=r),
    # kvbench's streaming_llm with key_rerotation=true
    "streaming_llm_rerotated": lambda r: KeyRerotationPress(StreamingLLMPress(compression_ratio=r, n_sink=4)),
}
RANDOM_SKETCH = ("compactor", "adakv_compactor")
# Presses that score the attention weights the layer computed: only eager attention returns them.
EAGER = ("observed_attention",)


def spy_rerotation(press) -> dict[int, torch.Tensor]:
    """A re-rotating press changes the kept keys, so they are no longer found among the uncompressed ones: record
    the kept positions it hands to its re-rotation instead (``[h, n_kept]`` per layer)."""
    kept: dict[int, torch.Tensor] = {}

    def rerotate_keys(module, indices, keys):
        kept[module.layer_idx] = indices[0]
        return KeyRerotationPress.rerotate_keys(module, indices, keys)

    press.rerotate_keys = rerotate_keys
    return kept


def kept_mask(model, full: list[torch.Tensor], cache: DynamicCache) -> np.ndarray:
    """[layers, kv_heads, L] bool: head-masked presses leave ``masked_key_indices`` on the attention modules;
    the others gather keys, so each stored key is found again among the uncompressed ones."""
    masks = []
    for idx, layer in enumerate(model.model.layers):
        full_keys = full[idx][0]  # [h, L, d]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        if masked is not None:
            mask = torch.ones(full_keys.shape[:2], dtype=torch.bool)
            _, heads, positions = masked
            mask[heads, positions] = False
        else:
            kept = cache.layers[idx].keys[0]  # [h, n, d]
            mask = (full_keys[:, :, None, :] == kept[:, None, :, :]).all(-1).any(-1)
        masks.append(mask.numpy())
    return np.stack(masks)


@torch.no_grad()
def run(model, context: torch.Tensor, question: torch.Tensor, press, full: list[torch.Tensor] | None):
    for layer in model.model.layers:
        layer.self_attn.masked_key_indices = None
    cache = DynamicCache()
    rerotated = spy_rerotation(press) if isinstance(press, KeyRerotationPress) else None
    if press is None:
        model.model(input_ids=context, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=context, past_key_values=cache)
    if rerotated:
        mask = np.stack([np.isin(np.arange(context.shape[1]), rerotated[i].numpy()[h])
                         for i in sorted(rerotated) for h in range(rerotated[i].shape[0])])
        mask = mask.reshape(len(rerotated), -1, context.shape[1])
    else:
        mask = kept_mask(model, full, cache) if full is not None else None
    context_keys = [layer.keys.clone() for layer in cache.layers]  # before the question is appended
    # kvpress' pipeline asks the question right after the context; after key re-rotation, the context is as long
    # as the compressed cache
    start = cache.get_seq_length() if rerotated else context.shape[1]
    positions = torch.arange(start, start + question.shape[1])[None]
    if len({layer.keys.shape[-2] for layer in cache.layers}) == 1:
        logits = model(input_ids=question, past_key_values=cache, position_ids=positions).logits[0, -1]
    else:
        # Layers of different lengths (PyramidKV): transformers builds one attention mask for all layers from the
        # first layer's length, which breaks a multi-token step; one token at a time needs no mask (causal).
        for i in range(question.shape[1]):
            logits = model(input_ids=question[:, i : i + 1], past_key_values=cache, position_ids=positions[:, i : i + 1]).logits[0, -1]
    return mask, logits.float(), context_keys


def main(inputs_path: str, out_path: str) -> None:
    spec = json.loads(open(inputs_path).read())
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa").eval()
    eager = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="eager").eval()
    context, question = torch.tensor([spec["context_ids"]]), torch.tensor([spec["question_ids"]])
    out: dict[str, np.ndarray] = {"context_ids": context[0].numpy(), "question_ids": question[0].numpy()}
    _, logits, full = run(model, context, question, None, None)
    _, _, full_eager = run(eager, context, question, None, None)  # eager's keys differ from sdpa's by rounding
    top = int(spec.get("top_logits", logits.numel()))
    ids = logits.topk(min(top, logits.numel())).indices.sort().values
    out["logit_ids"] = ids.numpy()
    out["logits/no_press"] = logits[ids].numpy()
    for name, make in PRESSES.items():
        for ratio in spec["ratios"]:
            seeds = spec["sketch_seeds"] if name in RANDOM_SKETCH else [0]
            for seed in seeds:
                torch.manual_seed(seed)
                on, uncompressed = (eager, full_eager) if name in EAGER else (model, full)
                mask, logits, _ = run(on, context, question, make(ratio), uncompressed)
                key = f"{name}/{ratio}" + (f"/seed{seed}" if name in RANDOM_SKETCH else "")
                out[f"kept/{key}"] = np.packbits(mask, axis=-1)
                out[f"logits/{key}"] = logits[ids].numpy()
                print(f"{key}: kept {mask.mean():.3f}", flush=True)
    out["context_length"] = np.array(context.shape[1])
    np.savez_compressed(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
