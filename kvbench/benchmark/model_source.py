"""Which model the speed benchmark runs: a ``conf/model`` preset, a packaged name, a local directory, a hub id,
or ``random:<spec>`` (the same architecture with random weights; no weights are downloaded).

The config is resolved first and on its own, so every check (supported family, maximum length) runs before
any weights are loaded or built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.benchmark.configs import RANDOM_CONFIGS
from kvbench.errors import KVBenchError
from kvbench.models import (
    ATTENTION_IMPLEMENTATIONS,
    ModelSpec,
    check_supported,
    load_config,
    load_model,
    max_length,
    resolve_device,
    resolve_dtype,
)

RANDOM_PREFIX = "random:"
PRESET_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--model``: ``name`` labels the CSV and plots, ``config`` is read without weights."""

    name: str
    name_or_path: str
    config: object
    random_weights: bool


def preset_name_or_path(name: str) -> str | None:
    """``name_or_path`` of the ``conf/model/<name>.yaml`` preset, or None when no such preset exists."""
    path = PRESET_DIR / f"{name}.yaml"
    if "/" in name or not path.is_file():
        return None
    from omegaconf import OmegaConf

    return str(OmegaConf.load(path).name_or_path)


def _config_from_dict(values: dict):
    from transformers import AutoConfig

    values = dict(values)
    if "model_type" not in values:
        raise KVBenchError("a random-weights config needs a 'model_type' key (for example \"llama\")")
    return AutoConfig.for_model(**values)


def _random_config(target: str):
    if target in RANDOM_CONFIGS:
        return _config_from_dict(RANDOM_CONFIGS[target])
    path = Path(target).expanduser()
    if path.is_file():  # a config.json of its own
        try:
            return _config_from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise KVBenchError(f"{path} is not a JSON model config ({exc}); give a Hugging Face config.json") from exc
    return load_config(preset_name_or_path(target) or target)


def resolve_source(spec: str) -> ModelSource:
    """Read the config of ``--model`` (no weights). Unknown directories and unsupported families raise here."""
    random = spec.startswith(RANDOM_PREFIX)
    target = spec.removeprefix(RANDOM_PREFIX)
    if not target:
        raise KVBenchError(
            f"--model {spec!r} names no model; give random:<{' | '.join(RANDOM_CONFIGS)} | conf/model preset | config.json | hub id>"
        )
    if random:
        config = _random_config(target)
        name_or_path = target
    else:
        name_or_path = preset_name_or_path(target) or target
        config = load_config(name_or_path)
    check_supported(config)
    return ModelSource(name=("random-" if random else "") + _label(target), name_or_path=name_or_path, config=config,
                       random_weights=random)


def _label(target: str) -> str:
    """The model's name in the CSV and plots: a folder's name (``Llama-3.1-8B``, not the ``Llama-3`` a suffix-stripping
    stem gives), a config file's folder, a hub id's last part."""
    path = Path(target).expanduser()
    if path.is_file():
        return path.parent.resolve().name if path.name == "config.json" else path.stem
    if path.exists():
        return path.resolve().name
    return target.rstrip("/").rsplit("/", 1)[-1]


def check_runtime(device: str, dtype: str, attn: str) -> tuple[torch.device, torch.dtype]:
    """Resolve ``--device``/``--dtype`` and check ``--attn`` (raises for bad values, loads nothing)."""
    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise KVBenchError(f"unknown attention implementation '{attn}'; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)


def load(source: ModelSource, device: str, dtype: str, attn: str, seed: int = 0):
    """The model in eval mode on its device: loaded through ``kvbench.models`` or built from the config."""
    if not source.random_weights:
        model, _ = load_model(ModelSpec(source.name_or_path, dtype=dtype, attn_implementation=attn, device=device))
        return model
    from transformers import AutoModelForCausalLM

    resolved, torch_dtype = check_runtime(device, dtype, attn)
    torch.manual_seed(seed)
    try:
        with torch.device(resolved):  # built in place: an 8B model never passes through host memory
            model = AutoModelForCausalLM.from_config(source.config, dtype=torch_dtype, attn_implementation=attn)
    except ImportError as exc:
        raise KVBenchError(f"attn_implementation={attn} is not available here ({exc}); use sdpa or eager") from exc
    return model.eval()


def check_prefill_args(source: ModelSource, context: int, ratios: list[float], repeats: int = 1) -> None:
    """The benchmark scripts' own numbers, refused in one line before the model loads (a zero context failed deep in
    the prefill, a zero repeat count in the median, a ratio of 1.5 after the model had loaded)."""
    limit = max_length(source.config)
    if context < 1 or (limit is not None and context > limit):
        raise KVBenchError(f"--context must be a number of tokens from 1 to the model's {limit or 'maximum'}, got {context}")
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if bad:
        raise KVBenchError(f"a compression ratio is a number in [0, 1) (the fraction of the cache removed), got {bad[0]:g}")
    if repeats < 1:
        raise KVBenchError(f"--repeats must be at least 1, got {repeats}")
