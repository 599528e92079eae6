"""The kernels compile for an H100 (sm_90) with the installed Triton, on a machine without a GPU,
with vectorised channel loads: the interpreter, which runs them everywhere else in CI, checks
their math but compiles nothing. The Gluon forward (kernels/hopper.py), which no interpreter
runs, compiles with its asynchronous wgmma and TMA weight tiles."""
from pathlib import Path

import pytest
import torch
import triton

from helpers import REPO, compiled_run

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SM90_SHARED = 232448        # bytes of shared memory a block may take on sm_90 (227 KiB)

try:
    import kernels.hopper  # noqa: F401
    HOPPER_MISSING = ""
except (ImportError, AttributeError) as error:     # a Triton without Gluon's Hopper API
    HOPPER_MISSING = str(error)


def compile_check(*args, shape="tiny"):
    """compile_check.py's lines for these arguments (on ``shape``, first configs)."""
    return compiled_run(str(REPO / "bench" / "compile_check.py"), "--shape", shape, "--first",
                        *args)


def registers(line):
    return int(line.split(":")[-1].split("regs")[0])


def figure(line, unit):
    """The number before ``unit`` in a line (" B stack/local", " B shared", " wgmma", ...)."""
    return int(line.split(unit)[0].split()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite compiles them for real")
@pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="Triton without its CUDA tools")
def test_kernels_compile_for_sm90():
    lines = compile_check("--dtype", "bfloat16", "float32", "float32-tf32")
    # 3 dtypes x 2 kernels, and the Gluon forward for bf16 only, each with its registers read
    # back from the cubin, and channel rows moved several channels per instruction (a runtime
    # mask or offset along the channels that Triton cannot prove aligned turns them into one
    # load / atomic per element); the data kernel's column tiles stored by the threads that
    # loaded them (it overwrites its input)
    hopper = [line.split()[0] for line in lines if line.split()[1] == "FWD_HOPPER"]
    assert hopper == ([] if HOPPER_MISSING else ["bfloat16"]), lines
    assert len(lines) == 6 + len(hopper), lines
    for line in lines:
        cap = int(line.split("maxnreg=")[1].split(":")[0]) if "maxnreg=" in line else 255
        assert 0 < registers(line) <= cap, line
        assert int(line.split(" vector loads")[0].split()[-1]) > 0, line
        if "BWD_DATA" in line:
            assert int(line.split(" vector atomics")[0].split()[-1]) > 0, line
            assert line.endswith("tile stores in place"), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite compiles them for real")
@pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="Triton without its CUDA tools")
def test_deterministic_data_kernel_compiles_for_sm90():
    """The fixed-point input gradient of deterministic mode (int64 atomics)."""
    lines = compile_check("--dtype", "bfloat16", "--kernel", "BWD_DATA", "--deterministic")
    assert len(lines) == 1 and 0 < registers(lines[0]) <= 255, lines
    assert lines[0].endswith("tile stores in place"), lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite compiles them for real")
@pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="Triton without its CUDA tools")
def test_pulled_input_gradient_compiles_for_sm90():
    """The pulled input gradient (D2CONV_INPUT_GRAD=pull): its brick kernel, and the data kernel
    without the input gradient's atomics."""
    lines = compile_check("--dtype", "bfloat16", "float32", "--kernel", "BWD_INPUT", "BWD_DATA",
                          "--pull")
    assert [line.split()[1] for line in lines] == ["BWD_INPUT", "BWD_DATA"] * 2, lines
    for line in lines:
        assert 0 < registers(line) <= 255, line
        assert int(line.split(" vector loads")[0].split()[-1]) > 0, line
        assert int(line.split(" vector atomics")[0].split()[-1]) == 0, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite compiles them for real")
@pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="Triton without its CUDA tools")
@pytest.mark.skipif(bool(HOPPER_MISSING),
                    reason=f"this Triton cannot build the Gluon forward: {HOPPER_MISSING}")
@pytest.mark.parametrize("shape, dtypes", [("tiny", ["bfloat16", "float16"]),
                                           ("rf2", ["bfloat16"])])
def test_hopper_forward_compiles_for_sm90(shape, dtypes):
    """The Gluon forward's default config, at the paper's rf2 shape too: its two shared-memory
    slots within sm_90's limit, the weight tiles loaded by TMA, the wgmma products asynchronous
    (a wait that leaves one in flight while the next tile is gathered), and at most a few spilled
    registers. At rf2 its 64x256 fp32 accumulator holds 128 of a thread's 255 registers and 32
    bytes spill (Triton 3.6 and 3.9), stored and reloaded once per segment and tap class, outside
    the loop over channel blocks (its SASS); the tile that spills nothing, 64x256x16, ran rf2 in
    1.07 ms against 0.76 (H200, 2026-12-02)."""
    lines = compile_check("--dtype", *dtypes, "--kernel", "FWD_HOPPER", shape=shape)
    assert [line.split()[:2] for line in lines] == [[d, "FWD_HOPPER"] for d in dtypes], lines
    for line in lines:
        print(shape, line)
        assert 0 < registers(line) <= 255, line
        assert figure(line, " B shared") <= SM90_SHARED, line
        assert figure(line, " wgmma") > 0, line
        assert "wait_group 1 present" in line, line
        assert figure(line, " TMA loads") > 0, line
        spills = figure(line, " B stack/local")
        assert spills <= (0 if shape == "tiny" else 32), (
            f"the default FWD_HOPPER config (kernels/configs.py, the first 16-bit candidate) "
            f"spills {spills} B a thread at {shape} ({registers(line)} registers): {line}")
