"""The bench's tools stay in step with the library and with their records: the scripts import
against the kernels as they are, table.py renders the H200 record, records.py merges a timing in
place of the earlier one of its case, and bench/results holds JSON records only."""
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = ["ablate", "compile_check", "inference", "ncu_profile", "records", "table"]


@pytest.fixture
def bench_path(monkeypatch):
    """bench/ on sys.path, as for a script run from there (restored afterwards)."""
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports(bench_path, name):
    """Each script's imports exist: the kernels' names it uses, test_kernel_speed's shapes."""
    importlib.import_module(name)


def test_table_of_the_h200_record(bench_path):
    """One line per (shape, dtype, pass) with a dense timing, each op's ratio to dense."""
    table = importlib.import_module("table")
    rows = json.loads((BENCH / "results" / "NVIDIA_H200.json").read_text())
    lines = table.table(rows).splitlines()
    cases = {(r["shape"], r["dtype"], r["pass"]) for r in rows if r["op"] == "dense"}
    assert len(lines) == 2 + len(cases)
    rf2 = next(line for line in lines if line.startswith("| rf2 | bfloat16 | fwdbwd |"))
    dense, d2conv = (r["median_ms"] for op in ("dense", "d2conv3d") for r in rows
                     if (r["shape"], r["dtype"], r["op"], r["pass"])
                     == ("rf2", "bfloat16", op, "fwdbwd"))
    assert f"({d2conv / dense:.1f}×)" in rf2


def test_merge_replaces_the_same_case(bench_path, monkeypatch, tmp_path):
    records = importlib.import_module("records")
    monkeypatch.setattr(records, "RESULTS", tmp_path / "out")
    key = ("shape", "op")
    records.merge("card.json", {"shape": "rf2", "op": "dense", "ms": 1.0}, key)
    records.merge("card.json", {"shape": "rf3", "op": "dense", "ms": 2.0}, key)
    records.merge("card.json", {"shape": "rf2", "op": "dense", "ms": 3.0}, key)
    rows = json.loads((tmp_path / "out" / "card.json").read_text())
    assert rows == [{"shape": "rf2", "op": "dense", "ms": 3.0},
                    {"shape": "rf3", "op": "dense", "ms": 2.0}]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_results_are_json_records():
    """bench/results holds JSON records only, each readable."""
    files = sorted((BENCH / "results").iterdir())
    assert files
    for path in files:
        assert path.suffix == ".json", f"{path.name}: not a JSON record"
        json.loads(path.read_text())
