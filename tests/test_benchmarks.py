"""The committed benchmark results stay renderable: docs/benchmarks.md's tables come from them."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def _speed_module():
    spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_every_committed_result_renders_one_row_per_method(path):
    results = json.loads(path.read_text())
    lines = _speed_module().markdown_table(results).splitlines()
    columns = lines[0].count("|")
    assert lines[1].count("|") == columns
    rows = lines[2:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(results["methods"])
    for row, method in zip(rows, results["methods"].values(), strict=True):
        assert "error" in row or row.count("|") == columns
        if "test_scores" in method.get("ours_equal", {}):  # the quality check is shown where it was measured
            scores = method["ours_equal"]["test_scores"]
            assert f"/ {scores['rougeL']:.2f} |" in row
