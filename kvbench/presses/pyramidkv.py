"""PyramidKV (arXiv:2406.02069): lower layers spread attention wide, higher layers focus, so budgets shrink
with depth.

Each layer keeps a budget on a line from ``max_num`` (layer 0) down to ``min_num`` (last layer) whose mean is the
uniform budget, so the model keeps as many tokens as SnapKV at the same ratio; inside a layer tokens are chosen by
SnapKV's observation-window votes. The line follows kvpress' PyramidKVPress (itself KVCache-Factory's formula):
``min_num = (mean budget) / beta``, ``max_num = 2 * (mean budget) - min_num``; ``max_num`` is capped at
``seq_len - window_size`` (the other end moves to keep the mean); when the pyramid does not fit
(``seq_len >= max_num >= min_num >= window_size`` fails) every layer falls back to the uniform budget
(rounded to nearest, as kvpress does).
Following kvpress, not the paper's code (KVCache-Factory): the mean budget is always
``seq_len * (1 - compression_ratio)`` (the paper's code keeps a fixed budget and leaves short prompts alone), and a
layer's budget counts its observation window (the paper's code adds the window on top of the line), so the
layers keep the uniform total (up to rounding), as kvpress' leaderboard ran it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.presses import selection
from kvbench.presses.base import LayerState, require_number
from kvbench.presses.snapkv import SnapKVPress


def pyramid_budget(mean_budget: float, seq_len: int, window_size: int, beta: float, layer_idx: int,
                   num_layers: int) -> int:
    """Tokens layer ``layer_idx`` of ``num_layers`` keeps when the layers keep ``mean_budget`` on average."""
    min_num = mean_budget / beta
    max_num = 2 * mean_budget - min_num
    if max_num >= seq_len - window_size:
        max_num = seq_len - window_size
        min_num = 2 * mean_budget - max_num
    if not seq_len >= max_num >= min_num >= window_size:
        return max(1, round(mean_budget))
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0  # kvpress: one layer keeps max_num
    return round(max_num - layer_idx * steps)


@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV scores with pyramid budgets: more tokens in lower layers, fewer in higher ones, same total."""

    beta: float = 20.0

    head_adaptive: ClassVar[bool] = True  # stored through the head-adaptive paths (see ``select``)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_number(self, "beta", 1.0)  # it divides the mean budget: below 1 the bottom layer gets more than all

    def layer_budget(self, state: LayerState, n_kept: int) -> int:
        """This layer's share: the pyramid line around the uniform budget (``budget`` tokens when given)."""
        seq_len = state.seq_len
        mean = float(n_kept) if self.budget is not None else seq_len * (1.0 - self.compression_ratio)
        num_layers = int(state.module.config.num_hidden_layers)
        budget = pyramid_budget(mean, seq_len, self.window_size, self.beta, state.layer_idx, num_layers)
        return max(1, min(budget, seq_len))

    def select(self, scores: torch.Tensor, state: LayerState, n_kept: int) -> selection.Selection:
        # Every head of a layer keeps the same count, but layers keep different counts: a shared dense cache
        # cannot hold that (the model builds one attention mask for all layers from the first one's length), so the
        # selection is handed over as a mask and stored through the head-adaptive paths (packed, or masked with
        # a per-layer mask).
        indices = selection.topk_positions(scores, self.layer_budget(state, n_kept))
        return selection.Selection(mask=selection.mask_from_indices(indices, scores.shape[-1]))
