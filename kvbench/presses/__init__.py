"""The press registry: user-facing names -> (scorer class, wrapper, default parameters).

Names are a public interface (configs, result directories and leaderboards use them): keep them stable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kvbench.errors import KVBenchError
from kvbench.presses.adakv import AdaKVPress, WrapperPress
from kvbench.presses.base import LayerState, Press
from kvbench.presses.compactor import CompactorPress
from kvbench.presses.criticalkv import CriticalAdaKVPress, CriticalKVPress
from kvbench.presses.expected_attention import ExpectedAttentionPress
from kvbench.presses.keydiff import KeyDiffPress
from kvbench.presses.observed_attention import ObservedAttentionPress
from kvbench.presses.pyramidkv import PyramidKVPress
from kvbench.presses.simple import KnormPress, NoPress, RandomPress, StreamingLLMPress
from kvbench.presses.snapkv import SnapKVPress
from kvbench.presses.tova import TOVAPress


@dataclass(frozen=True)
class PressEntry:
    scorer: type[Press]
    wrapper: type[WrapperPress] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


PRESSES: dict[str, PressEntry] = {
    "no_press": PressEntry(NoPress, description="baseline, nothing removed"),
    "knorm": PressEntry(KnormPress, description="drop keys with the largest L2 norm"),
    "random": PressEntry(RandomPress, description="seeded random scores"),
    "streaming_llm": PressEntry(StreamingLLMPress, description="attention sinks + most recent tokens"),
    "snapkv": PressEntry(SnapKVPress, description="SnapKV, observation window votes"),
    "adakv_snapkv": PressEntry(SnapKVPress, AdaKVPress, description="AdaKV head-adaptive budgets around SnapKV"),
    "expected_attention": PressEntry(
        ExpectedAttentionPress, AdaKVPress, {"epsilon": 1e-2}, "AdaKV around Expected Attention"
    ),
    "compactor": PressEntry(CompactorPress, description="leverage + chunked attention"),
    "adakv_compactor": PressEntry(CompactorPress, AdaKVPress, description="AdaKV around Compactor"),
    "critical_snapkv": PressEntry(SnapKVPress, CriticalKVPress, description="CriticalKV two-stage around SnapKV"),
    "critical_adakv_snapkv": PressEntry(
        SnapKVPress, CriticalAdaKVPress, description="CriticalKV inside AdaKV budgets around SnapKV"
    ),
    # kvpress' leaderboard runs Expected Attention under CriticalKV without its own value-norm rescaling (CriticalKV
    # rescales by the projected value norm instead). ``epsilon`` is CriticalKV's; Expected Attention only reads its
    # own epsilon when use_vnorm=true.
    "critical_expected_attention": PressEntry(
        ExpectedAttentionPress, CriticalKVPress, {"use_vnorm": False}, "CriticalKV two-stage around Expected Attention"
    ),
    "critical_adakv_expected_attention": PressEntry(
        ExpectedAttentionPress, CriticalAdaKVPress, {"use_vnorm": False},
        "CriticalKV inside AdaKV budgets around Expected Attention",
    ),
    "pyramidkv": PressEntry(PyramidKVPress, description="SnapKV votes, pyramid budgets shrinking with depth"),
    "tova": PressEntry(TOVAPress, description="attention of the last context token, one ranking per layer"),
    "keydiff": PressEntry(KeyDiffPress, description="keep keys least similar to the mean key"),
    "observed_attention": PressEntry(
        ObservedAttentionPress, description="mean attention received during prefill (needs eager attention)"
    ),
}

SHARED_PARAMS = ("compression_ratio", "budget")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"press"}


def press_parameters(name: str) -> dict[str, Any]:
    """Every parameter of a registry press with its default (what a config file lists)."""
    entry = _entry(name)
    params = {f.name: f.default for f in dataclasses.fields(entry.scorer)}
    if entry.wrapper is not None:
        params.update({f.name: f.default for f in dataclasses.fields(entry.wrapper) if f.name != "press"})
    params.update(entry.defaults)
    return params


def _entry(name: str) -> PressEntry:
    if name not in PRESSES:
        raise KVBenchError(f"unknown press '{name}'; valid names: {', '.join(sorted(PRESSES))}")
    return PRESSES[name]


def build_press(name: str, **params: Any) -> Press:
    """Build a registry press; parameters are routed to the scorer or its wrapper by name."""
    entry = _entry(name)
    params = {**entry.defaults, **params}
    scorer_fields = _field_names(entry.scorer)
    wrapper_fields = _field_names(entry.wrapper) if entry.wrapper else set()
    unknown = set(params) - scorer_fields - wrapper_fields
    if unknown:
        valid = sorted(scorer_fields | wrapper_fields)
        raise KVBenchError(f"press '{name}' has no parameter {', '.join(sorted(unknown))}; valid: {', '.join(valid)}")
    if entry.wrapper is None:
        return entry.scorer(**params)
    inner = entry.scorer(**{k: v for k, v in params.items() if k in scorer_fields and k not in SHARED_PARAMS})
    return entry.wrapper(press=inner, **{k: v for k, v in params.items() if k in wrapper_fields})


def check_attention(name: str, press: Press, attn_implementation: str, remedy: str) -> None:
    """Refuse a press that reads the attention weights under an attention that does not return them (only eager
    does); ``remedy`` says how the caller's user selects eager attention."""
    if getattr(press, "needs_attention_weights", False) and attn_implementation != "eager":
        raise KVBenchError(f"press '{name}' needs the attention weights, which only eager attention returns; {remedy}")


__all__ = ["PRESSES", "build_press", "check_attention", "press_parameters", "Press", "LayerState"]
