"""Compressed layers append decode tokens in place: same tensors as concatenation, amortised copies, no aliasing."""

from __future__ import annotations

import torch

from kvbench.compression.cache import CompressedLayer, layer_bytes, truncate


def _kv(batch: int, heads: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, n, 8, generator=g), torch.randn(batch, heads, n, 8, generator=g)


def test_appending_token_by_token_equals_concatenation_with_few_reallocations():
    keys, values = _kv(2, 3, 40, 0)
    layer = CompressedLayer(keys.clone(), values.clone(), removed=10)
    expected_k, expected_v, storages = keys, values, set()
    for step in range(300):
        k, v = _kv(2, 3, 1, step + 1)
        got_k, got_v = layer.update(k, v, 0)
        expected_k, expected_v = torch.cat([expected_k, k], -2), torch.cat([expected_v, v], -2)
        assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
        storages.add(got_k.untyped_storage().data_ptr())
    assert layer.get_seq_length() == 340 + 10
    # grown by MIN_SPARE tokens (a 32nd of a row past 256): dozens of buffers for 300 tokens, not 300
    assert len(storages) <= 300 // CompressedLayer.MIN_SPARE
    # the spare capacity is memory the layer holds, so it is counted, and it stays a small share of it
    stored = expected_k.nbytes + expected_v.nbytes
    assert stored <= layer_bytes(layer) <= stored * (1 + 1 / CompressedLayer.SPARE_DIVISOR)


def test_the_tensors_a_layer_was_built_from_are_never_written():
    keys, values = _kv(1, 2, 16, 1)
    original_k, original_v = keys.clone(), values.clone()
    layer = CompressedLayer(keys, values, removed=0)
    for step in range(5):
        layer.update(*_kv(1, 2, 1, step + 10), 0)
    assert torch.equal(keys, original_k) and torch.equal(values, original_v)


def test_after_a_truncate_the_context_survives_and_the_next_answer_follows_it():
    keys, values = _kv(1, 2, 16, 2)
    layer = CompressedLayer(keys.clone(), values.clone(), removed=4)
    cache = type("Cache", (), {"layers": [layer]})()
    for step in range(7):
        layer.update(*_kv(1, 2, 1, step + 20), 0)
    truncate(cache, [16])
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    k, v = _kv(1, 2, 3, 99)
    got_k, got_v = layer.update(k, v, 0)
    assert torch.equal(got_k, torch.cat([keys, k], -2)) and torch.equal(got_v, torch.cat([values, v], -2))


def test_a_view_of_part_of_the_batch_starts_its_own_buffer():
    keys, values = _kv(2, 2, 8, 3)
    layer = CompressedLayer(keys.clone(), values.clone(), removed=0)
    layer.update(*_kv(2, 2, 1, 30), 0)
    full_k = layer.keys.clone()
    # the first sequence only: its view starts at the buffer's address but must not be appended into the buffer
    layer.keys, layer.values = layer.keys[:1], layer.values[:1]
    k, v = _kv(1, 2, 1, 31)
    got_k, _ = layer.update(k, v, 0)
    assert got_k.shape == (1, 2, 10, 8)
    assert torch.equal(got_k, torch.cat([full_k[:1], k], -2))
