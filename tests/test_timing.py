"""What the timing columns of a QA run measure: time to first token includes the context's prefill (and its
compression), and a per-token time exists only where tokens were decoded after the first."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_an_answer_of_one_token_has_no_decode_time():
    """A one-token answer decodes no step: its per-token time is NaN (dropped by the mean), not a near-zero that
    pulled a run's seconds_per_token down."""
    import torch

    import kvbench
    from kvbench.generation import Prompt, answer_prompts
    from kvbench.runner import summarize_speed
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(3))
    prompt = Prompt(ids[:, :40], [ids[:, 40:]])
    press = kvbench.build_press("no_press")

    class Tokenizer:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    one = answer_prompts(model, Tokenizer(), [prompt], [press], [[1]])[0][0].answers[0]
    five = answer_prompts(model, Tokenizer(), [prompt], [press], [[5]])[0][0].answers[0]
    assert len(one.token_ids) == 1 and math.isnan(one.seconds_per_token)
    assert len(five.token_ids) == 5 and five.seconds_per_token > 0 and one.question_seconds > 0
    speed = summarize_speed(pd.DataFrame({"seconds_per_token": [one.seconds_per_token, five.seconds_per_token]}))
    assert speed["seconds_per_token"] == pytest.approx(five.seconds_per_token)


@pytest.mark.integration
def test_a_qa_runs_time_to_first_token_includes_the_prefill(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "kvbench", "dataset=needle", "dataset.context_lengths=[256]",
                           "dataset.depths=[50]", "press=knorm", f"output_dir={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    (csv,) = out.glob("*/predictions.csv")
    row = pd.read_csv(csv).iloc[0]
    assert row["ttft_seconds"] == pytest.approx(row["prefill_seconds"] + row["question_seconds"], rel=1e-9)
    assert row["question_seconds"] > 0 and row["prefill_seconds"] > 0
