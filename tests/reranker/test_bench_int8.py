"""`python -m reranker.bench int8`: every projection of the layer measured on the input it really sees."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from common.paths import SCIFACT
from reranker.bench import int8


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    args = argparse.Namespace(model="", data=SCIFACT, rows=64, layer=2, repeats=1,
                              out=tmp_path_factory.mktemp("int8") / "r.json")
    return int8.run(args)


def test_captured_inputs_are_what_each_projection_saw() -> None:
    args = argparse.Namespace(model="", data=SCIFACT, rows=32, layer=1)
    linears, inputs, index, _ = int8.captured_inputs(args)
    assert index == 1 and set(inputs) == set(linears) and len(linears) == 7  # q, k, v, o, gate, up, down
    q, k = inputs["self_attn.q_proj"], inputs["self_attn.k_proj"]
    assert q.shape == (32, linears["self_attn.q_proj"].in_features) and torch.equal(q, k)  # both read the norm
    assert inputs["mlp.down_proj"].shape == (32, linears["mlp.down_proj"].in_features)


def test_every_projection_is_timed_in_every_dtype(result: dict, tmp_path: Path) -> None:
    assert len(result["projections"]) == 7 and result["rows"] == 64
    for r in result["projections"].values():
        assert all(r["ms"][d] > 0 for d in int8.DTYPES)
        # bf16 keeps 8 significant bits: each product is within 2^-8 relatively, and the sums of hundreds of
        # terms with random signs stay far below 0.02 of the output's norm
        assert r["relative_error"]["bf16"] < 0.02 and r["relative_error"]["int8"] > 0
    int8.plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
