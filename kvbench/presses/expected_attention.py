"""Expected Attention: score keys by the attention that *future* queries are expected to give them.

Future queries are modelled as Gaussian: mean and covariance of the context's pre-RoPE queries, rotated
by the RoPE rotation averaged over the next ``n_future_positions`` positions. For a Gaussian query the
expected exponentiated logit is exp(mu'.k/sqrt(d) + k^T Sigma' k / (2d)), whose softmax over keys is the
expected attention. Multiplying by ||v|| accounts for how much each value can move the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvbench.presses.base import LayerState, Press, require_bool, require_int, require_number


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Average RoPE rotation matrix [head_dim, head_dim] over the positions of cos/sin ``[n, r]``.

    RoPE (rotate-half layout) maps (x1, x2) -> (x1*c1 - x2*s1, x2*c2 + x1*s2) on the first r dims and
    leaves the rest (partial rotary) unchanged; it is linear, so its mean over positions is the matrix of
    mean cos / mean sin blocks.
    """
    c, s = cos.float().mean(dim=0), sin.float().mean(dim=0)
    r, half = c.shape[-1], c.shape[-1] // 2
    rot = torch.eye(head_dim, device=cos.device)
    idx1 = torch.arange(half, device=cos.device)
    idx2 = idx1 + half
    rot[idx1, idx1] = c[:half]
    rot[idx1, idx2] = -s[:half]
    rot[idx2, idx2] = c[half:r]
    rot[idx2, idx1] = s[half:r]
    return rot


@dataclass
class ExpectedAttentionPress(Press):
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int(self, "n_future_positions", 1)  # 0 future positions average nothing: NaN scores
        require_int(self, "n_sink", 0)
        require_bool(self, "use_covariance")
        require_bool(self, "use_vnorm")
        require_number(self, "epsilon", 0.0)

    def score(self, state: LayerState) -> torch.Tensor:
        b, kv_heads, seq_len, d = state.keys.shape
        sink = min(self.n_sink, seq_len - 1)
        # Sinks draw attention whatever their content; they are kept unconditionally and taken out before the
        # softmax and the value-norm rescaling, or heads that attend to them would see every other score shrink
        # (and under AdaKV lose budget to heads that do not).
        keys, values = state.keys[:, :, sink:].float(), state.values[:, :, sink:].float()
        q = state.pre_rope_queries(slice(sink, seq_len)).float()  # [b, H, n, d]
        n_heads = q.shape[1]
        group = n_heads // kv_heads
        mu = q.mean(dim=2)
        positions = torch.arange(seq_len, seq_len + self.n_future_positions, device=keys.device)[None]
        cos, sin = state.rotary(positions)
        rot = mean_rotation(cos[0], sin[0], d)
        mu = mu @ rot.T
        # The query heads sharing a KV head score its keys in one product each: [b, kv, L - sink, group]
        logits = keys @ mu.view(b, kv_heads, group, d).transpose(-1, -2) / math.sqrt(d)
        if self.use_covariance:
            centred = q - q.mean(dim=2, keepdim=True)
            cov = centred.transpose(-1, -2) @ centred / q.shape[2]
            cov = rot @ cov @ rot.T  # [b, H, d, d]
            # k^T Sigma_h k for every query head h of the group: (k @ [Sigma_h ...]) * k, summed over d
            stacked = cov.view(b, kv_heads, group, d, d).transpose(2, 3).reshape(b, kv_heads, d, group * d)
            quadratic = (keys @ stacked).view(b, kv_heads, -1, group, d).mul_(keys[:, :, :, None]).sum(dim=-1)
            logits = logits + quadratic / (2 * d)
        scores = logits.softmax(dim=-2).mean(dim=-1)  # softmax over the keys of each query head, then group mean
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.norm(dim=-1)
        return torch.nn.functional.pad(scores, (sink, 0), value=float("inf"))
