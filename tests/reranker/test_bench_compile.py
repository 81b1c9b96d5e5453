"""`python -m reranker.bench compile`: the served row-wise work of one layer, eager and compiled, on real inputs."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest

from common.paths import SCIFACT
from reranker.bench import compiled


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on a CPU builds C++ kernels: needs a C++ compiler")
def test_every_variant_is_timed_and_computes_what_eager_does(tmp_path: Path) -> None:
    args = argparse.Namespace(model="", data=SCIFACT, dtype="fp32", rows=64, layer=1, repeats=1, rounds=1,
                              out=tmp_path / "r.json")
    result = compiled.run(args)
    assert set(result["ms_per_chunk"]) == set(compiled.VARIANTS) and all(v > 0 for v in result["ms_per_chunk"].values())
    # fp32 both ways: the same sums in another order (fused kernels, other matmul blocking); a relative error
    # of a few float32 unit roundoffs times sqrt(inner size 1,536) is ~1e-5, far below 1e-3
    assert all(e < 1e-3 for e in result["relative_error_against_eager"].values())
    compiled.plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
