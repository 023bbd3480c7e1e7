"""The decoding bound: weight bytes per token and the measured copy bandwidth."""
from __future__ import annotations

import pytest

from flexigpt.bandwidth import copy_bandwidth, decode_bound, weight_bytes_per_token
from flexigpt.params import measure_params


def test_weight_bytes_count_each_tensor_once_and_one_embedding_row(tiny_model, tiny_opt_model):
    for model in (tiny_model, tiny_opt_model):
        counts = measure_params(model)
        embed = model.get_input_embeddings().weight
        tied = embed is model.get_output_embeddings().weight
        expected = 4 * counts.run if tied else 4 * (counts.run - embed.numel() + embed.shape[1])
        assert weight_bytes_per_token(model) == expected


def test_bound_is_bandwidth_over_bytes(tiny_model):
    bw = copy_bandwidth(megabytes=8, repeats=1)
    assert bw > 0
    assert decode_bound(tiny_model, bw) == pytest.approx(bw / weight_bytes_per_token(tiny_model))
    with pytest.raises(ValueError, match="megabytes"):
        copy_bandwidth(megabytes=1)
    with pytest.raises(ValueError, match="bandwidth"):
        decode_bound(tiny_model, 0.0)
