"""`make soak`, one minute of it: the three real services under the mixed workload, every request answered,
no series trending upward after warm-up (deploy.trend), the report and plot written."""

import json

import pytest

from deploy import soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_one_minute_soak(tmp_path, capsys) -> None:
    # Half the minute is warm-up: the first reranks of each batch size and tenant set the allocator's marks, after
    # 60 reranks that fill a bf16 reranker's kernel caches (~50 reranks of varied sizes, deploy.soak). No full
    # write warm-up (minutes): 20 writes, so the retriever's memory and write latencies are reported, not judged.
    code = soak.main(["--duration-s", "60", "--sample-s", "2", "--warmup-fraction", "0.5", "--out", str(tmp_path),
                      "--base-port", "51170", "--warmup-writes", "20", "--warmup-reranks", "60"])
    result = json.loads((tmp_path / "soak.json").read_text())
    assert code == 0, (result["growing"], result["codes"], capsys.readouterr().out[-3000:])
    assert result["failed"] == 0 and result["passed"]
    assert set(result["codes"]) == set(soak.WEIGHTS), result["codes"]  # every kind of operation ran
    assert len(result["samples"]) >= 25  # one every 2 s for a minute
    writes = {f"{kind}.{stat}" for kind in soak.WRITES for stat in ("p50_ms", "p99_ms")}
    assert set(result["not_judged"]) == {"retriever.rss_mib", *writes}
    for name in ("retriever", "reranker", "gateway"):
        assert {f"{name}.{m}" for m in soak.FLOORS} <= set(result["trends"])
    assert (tmp_path / "soak.png").stat().st_size > 0
