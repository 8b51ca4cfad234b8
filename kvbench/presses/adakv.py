"""AdaKV wrapper: any scorer, head-adaptive budgets (arXiv:2407.11550)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from kvbench.presses import selection
from kvbench.presses.base import LayerState, Press, require_number
from kvbench.presses.snapkv import SnapKVPress


@dataclass
class WrapperPress(Press):
    """A press that reuses another press' scores. The wrapper owns ``compression_ratio``/``budget`` and
    hands them to the inner press (Compactor's default blending reads the ratio)."""

    press: Press = field(default_factory=SnapKVPress)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.press.compression_ratio, self.press.budget = self.compression_ratio, self.budget

    def score(self, state: LayerState) -> torch.Tensor:
        self.press.compression_ratio, self.press.budget = self.compression_ratio, self.budget
        return self.press.score(state)

    @property
    def window(self) -> int | None:
        return self.press.window


@dataclass
class AdaKVPress(WrapperPress):
    alpha_safeguard: float = 0.2

    head_adaptive: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_number(self, "alpha_safeguard", 0.0, 1.0)  # the share of each head's budget it always keeps

    def select(self, scores: torch.Tensor, state: LayerState, n_kept: int) -> selection.Selection:
        return selection.adakv(scores, n_kept, self.alpha_safeguard)
