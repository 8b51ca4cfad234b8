"""Rebuild the kvpress reference fixtures that tests/test_reference.py compares kvbench with.

kvpress 0.5.5 (the implementation behind the published kvpress leaderboard) pins transformers < 5.3, so it
never joins kvbench's environment: this script builds it in a throw-away virtual environment, then runs
``kvpress_side.py`` there on two models and saves small fixtures (kept positions per layer and head, and the
logits of a question after compression):

- ``tiny_llama_gqa/``: a tiny random Llama with grouped-query attention (weights committed, so both sides see
  the very same model), on 320 random tokens;
- ``smollm2.npz``: the packaged SmolLM2-135M-Instruct on the opening of a Paul Graham essay.

Run from the repository root with kvbench's environment (needs pip access to PyPI, about 2 GB and 10 minutes):

    .venv/bin/python tests/reference/make_fixtures.py [--venv /tmp/kvpress-ref]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
KVPRESS = "kvpress==0.5.5"
RATIOS = [0.25, 0.5, 0.875]
SKETCH_SEEDS = [0, 1, 2, 3, 4]
TINY_DIR = FIXTURES / "tiny_llama_gqa"
QUESTION = "\n\nQuestion: What is the main point of the text above? Answer in one sentence.\nAnswer:"


def reference_venv(path: Path) -> Path:
    """The throw-away venv with kvpress and the torch kvbench runs with (the CPU wheel, not CUDA)."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", KVPRESS], check=True)
    return python


def tiny_model_dir() -> Path:
    """A tiny random GQA Llama (2 layers, 4 query heads on 2 KV heads, head_dim 32), saved once in fp32.

    The weights are drawn wider than a trained model's init (std 0.1 instead of 0.02) so that attention is
    peaked and score rankings are decided by the method, not by rounding.
    """
    if (TINY_DIR / "model.safetensors").exists():
        return TINY_DIR
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(TINY_DIR)
    return TINY_DIR


def tiny_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (328,), generator=generator).tolist()
    return {"model_dir": str(tiny_model_dir()), "context_ids": ids[:320], "question_ids": ids[320:], "top_logits": 128}


def smollm2_inputs() -> dict:
    from kvbench.datasets.ruler_data import essay_words
    from kvbench.models import packaged_model_dir
    from transformers import AutoTokenizer

    model_dir = packaged_model_dir("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    context = tokenizer(" ".join(essay_words()[:1000]), add_special_tokens=False)["input_ids"][:700]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    return {"model_dir": str(model_dir), "context_ids": context, "question_ids": question, "top_logits": 512}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "kvpress-ref")
    args = parser.parse_args()
    python = reference_venv(args.venv)
    FIXTURES.mkdir(exist_ok=True)
    for name, inputs in (("tiny_llama_gqa", tiny_inputs()), ("smollm2", smollm2_inputs())):
        spec = {**inputs, "ratios": RATIOS, "sketch_seeds": SKETCH_SEEDS}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(spec, handle)
        env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        subprocess.run([str(python), str(HERE / "kvpress_side.py"), handle.name, str(FIXTURES / f"{name}.npz")], check=True, env=env)
        print(f"wrote {FIXTURES / f'{name}.npz'}")


if __name__ == "__main__":
    main()
