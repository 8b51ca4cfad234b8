"""kvbench: benchmark KV-cache compression methods ("presses") on Hugging Face causal LMs.

Library use without Hydra::

    import kvbench
    press = kvbench.build_press("snapkv", compression_ratio=0.5)
    with kvbench.compress(model, press):
        model.model(input_ids=context_ids, past_key_values=cache)
    model.generate(...)  # continues on the compressed cache
"""

from kvbench.errors import KVBenchError

__all__ = ["KVBenchError", "build_press", "compress", "PRESSES"]


def __getattr__(name):
    # Lazy so that `import kvbench` (e.g. for the dataset or metric modules) does not import torch hooks.
    if name in ("build_press", "PRESSES"):
        from kvbench import presses

        return getattr(presses, name)
    if name == "compress":
        from kvbench.compression import compress

        return compress
    raise AttributeError(name)
