"""The bench's tools stay in step with the library and with their records: the scripts import
against the kernels as they are, table.py renders the H200 record and a 2D record, the 2D suite's
3D op at T = 1 gets the 2D ops' data, records.py merges a timing in place of the earlier one of
its case, and bench/results holds JSON records only."""
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = ["ablate", "compile_check", "inference", "ncu_profile", "profile_model", "records",
           "table", "test_2d_speed", "test_model_ops_speed", "test_model_speed"]


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
    rf2 = next(line for line in lines
               if line.startswith("| rf2 | bfloat16") and "| fwdbwd |" in line)
    dense, d2conv = (r["median_ms"] for op in ("dense", "d2conv3d") for r in rows
                     if (r["shape"], r["dtype"], r["op"], r["pass"])
                     == ("rf2", "bfloat16", op, "fwdbwd"))
    assert f"({d2conv / dense:.1f}×)" in rf2


def test_table_of_a_2d_record(bench_path):
    """A 2D record (told apart by its ops) renders one line per (shape, pass): times, ratios to
    dense bf16, the speed-up over torchvision fp32; a missing case leaves its cell empty."""
    table = importlib.import_module("table")
    times = {("dense", "bfloat16"): 1.0, ("torchvision", "float32"): 12.0,
             ("torchvision", "float16"): 9.0, ("deform_conv2d", "float32"): 6.0,
             ("deform_conv2d", "bfloat16"): 3.0, ("d2conv2d", "bfloat16"): 2.5,
             ("deform_conv3d_t1", "bfloat16"): 3.1}
    rows = [dict(shape=shape, dtype=dtype, op=op, median_ms=ms * scale, autotuned=True,
                 **{"pass": pass_})
            for shape, scale in (("res56", 1), ("det64", 2))
            for pass_ in ("fwd", "fwdbwd") for (op, dtype), ms in times.items()
            if (shape, op) != ("res56", "torchvision")]
    assert table.is_2d(rows) and not table.is_2d([dict(op="dense")])
    assert table.is_2d([], "NVIDIA_H200-2d.json")
    lines = table.table_2d(rows).splitlines()
    assert len(lines) == 2 + 4
    assert lines[2].startswith("| det64 | fwd |") and lines[4].startswith("| res56 | fwd |")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["det64", "fwd", "2", "24", "18", "12 (6.0×)", "6 (3.0×)", "5 (2.5×)",
                     "6.2 (3.1×)", "4.0×"]
    cells = [c.strip() for c in lines[4].strip("|").split("|")]
    assert cells[3:5] == ["", ""] and cells[-1] == ""
    for r in rows:      # dense is not a kernel row: no mark; deform_conv2d bf16 is marked
        if (r["shape"], r["pass"], r["dtype"]) == ("res56", "fwd", "bfloat16"):
            r["autotuned"] = r["op"] not in ("dense", "deform_conv2d")
    lines = table.table_2d(rows).splitlines()
    assert [c.strip() for c in lines[4].strip("|").split("|")][6] == "3 (3.0×) d"
    assert lines[-1].startswith("d: the kernels' default configs")


def test_2d_suite_data(bench_path):
    """The 2D suite's deform_conv3d_t1 case is deform_conv2d's data as one frame: the float64
    references agree; every op's inputs have the documented shapes."""
    suite = importlib.import_module("test_2d_speed")
    torch = pytest.importorskip("torch")
    shape = (2, 4, 6, 7, 9)
    outs = {}
    for op in ("deform_conv2d", "d2conv2d", "deform_conv3d_t1", "dense"):
        torch.manual_seed(0)
        fn, inputs = suite.make(shape, "float32", op, device="cpu")
        if op == "dense":
            assert fn(*inputs).shape == (2, 6, 7, 9)
            continue
        assert [tuple(t.shape[:2]) for t in inputs] == [
            (2, 4), (2, {"d2conv2d": 2, "deform_conv3d_t1": 27}.get(op, 18)), (6, 4), (6,), (2, 9)]
        outs[op] = suite.reference(op)(*[t.double() for t in inputs])
    assert outs["deform_conv3d_t1"].shape == (2, 6, 1, 7, 9)
    torch.testing.assert_close(outs["deform_conv3d_t1"].squeeze(2), outs["deform_conv2d"])
    assert not torch.allclose(outs["d2conv2d"], outs["deform_conv2d"])


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


def test_smooth_size_map(bench_path):
    """The bench's smooth size map keeps the random map's range, [0.5, 3], with neighbours much
    closer than the per-voxel draws'."""
    import torch

    from test_kernel_speed import smooth_sizes
    torch.manual_seed(0)
    smooth = smooth_sizes(2, 4, 60, 108, "cpu")
    assert smooth.shape == (2, 3, 4, 60, 108)
    assert smooth.min() >= 0.5 and smooth.max() <= 3
    rough = torch.rand(2, 3, 4, 60, 108) * 2.5 + 0.5
    step = (smooth.diff(dim=-1).abs().mean() / rough.diff(dim=-1).abs().mean()).item()
    assert step < 0.3, step


@pytest.mark.parametrize("name, expected", [
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>", "GroupNorm"),
    ("_gn_stats_kernel", "GroupNorm"),
    ("void at::native::conv_depthwise3d_cuda_kernel<c10::BFloat16, float, 3, 3, 3>",
     "depthwise 3D conv"),
    ("depthwise_fwd_kernel", "depthwise 3D conv"),
    ("d2conv_fwd_hopper_kernel", "D²Conv"),
    ("d2conv_bwd_data_kernel", "D²Conv"),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>", "NCDHW <-> NDHWC copies"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "cuDNN convolutions"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16", "cuDNN convolutions"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN", "GEMMs"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdam>", "optimizer and clipping"),
    ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "copies and casts"),
    ("void at::native::vectorized_elementwise_kernel<4, AddFunctor<float>>", "elementwise"),
    ("Memset (Device)", "other"),
])
def test_profile_categories(bench_path, name, expected):
    """The profile's categories catch the kernels of the paper model's step by name."""
    assert importlib.import_module("profile_model").category(name) == expected
