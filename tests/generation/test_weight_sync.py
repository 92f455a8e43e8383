"""Contract: the weight refresh's HF tensors (checkpoint/hf/stream.py) are the same from every layout: the tiny
policy loaded at TP=2, EP=2 (SequentialMLP and GroupedMLP experts) and PP=2 streams exactly the TP=1 tensors,
on every rank; buckets stay within their size unless one tensor is larger."""

from __future__ import annotations

import pytest

from harness import run_world


@pytest.fixture(scope="module")
def res():
    return run_world(2, "generation.worlds_weight_sync:layouts", {}, timeout_s=300)


@pytest.mark.parametrize("layout", ["tp2", "ep2", "ep2_grouped", "pp2"])
def test_every_layout_streams_the_single_rank_tensors(res, layout):
    assert res[layout]["same_names"], res[layout]
    assert res[layout]["max_diff"] == 0.0, res[layout]


def test_buckets_are_bounded(res):
    assert res["num_tensors"] == 127 and res["num_buckets"] > 1
    assert res["max_bucket"] <= max(1 << 20, res["biggest_tensor"])
