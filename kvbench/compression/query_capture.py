"""Each layer's context queries, kept from the prefill so that presses do not project them a second time.

The attention module computes its queries (projection, the q norm of some families, RoPE) and hands them to
the attention function of ``config._attn_implementation``. During a prefill a pre-hook routes that one call
through ``capture_forward``, which keeps a reference to the query tensor and calls the implementation the
model was using with the same arguments, so the layer's output is unchanged. Projecting the context's queries
again costs about a tenth of a prefill on small models (q_proj is as wide as the hidden state): most of
Expected Attention's and Compactor's scoring cost.

Families whose eager attention function cannot be found are left alone; presses then project the queries
themselves (``LayerState.context_queries``).
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn

NAME = "kvbench_capture"
_FROM = "_kvbench_capture_from"
QUERIES = "_kvbench_queries"


def _implementation(module: nn.Module, name: str) -> Callable | None:
    """The attention function the module would call for ``name`` (its own modeling file's eager one for eager)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    if name == "eager":
        return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return None


def _restore(module: nn.Module) -> None:
    routed_from = module.__dict__.pop(_FROM, None)
    if routed_from is not None:
        module.config._attn_implementation_internal = routed_from


def capture_forward(module: nn.Module, query: torch.Tensor, *args, **kwargs):
    """transformers' attention-function interface: remember ``query`` [b, H, n, d], then attend as before."""
    implementation = module.__dict__[_FROM]
    _restore(module)
    setattr(module, QUERIES, query)
    return _implementation(module, implementation)(module, query, *args, **kwargs)


def route(module: nn.Module) -> None:
    """Send the module's next attention call through ``capture_forward`` (a pre-hook calls this at prefill)."""
    current = module.config._attn_implementation
    if current == NAME or _implementation(module, current) is None:
        return
    setattr(module, _FROM, current)
    module.config._attn_implementation_internal = NAME


def take(module: nn.Module) -> torch.Tensor | None:
    """The queries captured by the module's last call (once: the reference is dropped), or None."""
    _restore(module)  # in case the call never reached its attention function
    return module.__dict__.pop(QUERIES, None)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, capture_forward)
