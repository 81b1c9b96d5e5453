"""`python -m retriever.bench.freed_memory`: each malloc setting measured in its own fresh processes."""

from __future__ import annotations

import json
from pathlib import Path

from retriever.bench import freed_memory


def test_each_setting_is_measured_in_fresh_processes_and_summarised(tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    assert freed_memory.main(["--rounds", "1", "--docs", "16", "--queries", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["malloc_arenas"] == 2 and result["docs"] == 16 and result["rounds"] == 1
    by_keep = {row["keep_mb"]: row for row in result["results"]}
    assert set(by_keep) == {0, 256}
    for row in by_keep.values():
        assert row["docs_per_s"] > 0 and row["query_ms"] > 0 and row["peak_rss_mib"] > 100  # torch and a model
        assert row["rounds"]["docs_per_s"] == [row["docs_per_s"]]  # one round: the median is that round
    assert out.with_suffix(".png").stat().st_size > 0
