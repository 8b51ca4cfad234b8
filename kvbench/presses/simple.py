"""Presses whose score needs no attention: the baseline, key norm, random and StreamingLLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.presses.base import LayerState, Press, require_bool, require_int, require_seed


@dataclass
class NoPress(Press):
    """The baseline: keeps everything whatever ratio it is given, so its runs are the reference."""

    def n_kept(self, seq_len: int) -> int:
        return seq_len

    def score(self, state: LayerState) -> torch.Tensor:
        return torch.zeros(state.keys.shape[:-1], device=state.keys.device)


@dataclass
class KnormPress(Press):
    """Keys with a small L2 norm draw more attention (arXiv:2406.11430), so score = -||k|| (post-RoPE)."""

    def score(self, state: LayerState) -> torch.Tensor:
        return -state.keys.float().norm(dim=-1)


@dataclass
class RandomPress(Press):
    """Seeded random scores: the floor any real method must beat. Seed offset by layer so layers differ."""

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_seed(self)

    def score(self, state: LayerState) -> torch.Tensor:
        generator = torch.Generator(device=state.keys.device).manual_seed(self.seed + state.layer_idx)
        return torch.rand(state.keys.shape[:-1], generator=generator, device=state.keys.device)


@dataclass
class StreamingLLMPress(Press):
    """StreamingLLM (arXiv:2309.17453): attention sinks (first ``n_sink`` tokens) plus the most recent tokens.

    ``key_rerotation``: the paper's rolling cache gives the kept tokens the positions they have *in the cache*
    (sinks at 0..n_sink-1, the recent tokens right after), so later tokens continue at the cache length instead
    of the original context length. kvpress applies this with its KeyRerotationPress wrapper (the cache's keys
    are re-rotated to contiguous positions and its pipeline asks the question at the compressed length); here
    it is a switch, off by default as in kvpress' plain StreamingLLMPress.
    """

    n_sink: int = 4
    key_rerotation: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int(self, "n_sink", 0)
        require_bool(self, "key_rerotation")

    @property
    def rerotates_keys(self) -> bool:
        return bool(self.key_rerotation)

    def score(self, state: LayerState) -> torch.Tensor:
        b, h, seq_len, _ = state.keys.shape
        recency = torch.arange(seq_len, device=state.keys.device, dtype=torch.float32) / seq_len
        recency[: self.n_sink] = 2.0
        return recency.expand(b, h, seq_len)
