"""Autotuning (kernels/tuning.py): the fastest candidate is picked, remembered in memory and on
disk per GPU, Triton version and kernel source, and a second process times nothing; the
backward's configs are timed on the whole backward. Timings come from a stand-in timer, so this
runs on a CPU (the kernels under the interpreter)."""
import json

import pytest
import torch
import triton

import kernels
from helpers import Case, apply, make_inputs, reference, rel_err
from kernels import backward, configs, settings, tuning

pytestmark = pytest.mark.usefixtures("poison_empty")


COMPILE_AHEAD = tuning._compile_ahead


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Picks kept under tmp_path, on a GPU named as an H200, with nothing remembered yet; no
    compiling ahead (on a GPU it runs each candidate's pass once more, before the stand-in
    timer's)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(tuning, "_compile_ahead", lambda candidates, run: None)
    tuning.forget()
    with settings.override(tune_cache=str(tmp_path)):
        yield tmp_path
    tuning.forget()


class Timer:
    """Stands in for tuning.bench: runs the pass once and reports times[i] for the i-th."""

    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return self.times[self.calls - 1]


CANDIDATES = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=1) for b in (16, 32, 64)]


def test_the_fastest_is_picked_and_remembered_across_processes(cache, monkeypatch):
    ran = []
    timer = Timer([3.0, 1.0, 2.0])
    monkeypatch.setattr(tuning, "bench", timer)
    best = tuning.pick("FWD", (256, "bf16"), lambda: CANDIDATES, ran.append)
    assert best is CANDIDATES[1] and ran == CANDIDATES and timer.calls == 3
    assert tuning.pick("FWD", (256, "bf16"), lambda: CANDIDATES, ran.append) is best   # in memory
    (path,) = cache.glob("*.json")
    assert path.name == (f"NVIDIA_H200-triton{triton.__version__}-{tuning.source_hash()}.json")
    assert json.loads(path.read_text()) == {"FWD|256|bf16": dict(BLOCK=32, num_warps=4,
                                                                 num_stages=1, maxnreg=None)}
    tuning.forget()                                  # as a new process: read from the disk
    assert tuning.pick("FWD", (256, "bf16"), lambda: CANDIDATES, ran.append) == CANDIDATES[1]
    assert timer.calls == 3 and len(ran) == 3
    # another key is tuned and added beside the first
    monkeypatch.setattr(tuning, "bench", Timer([1.0, 2.0, 3.0]))
    assert tuning.pick("FWD", (512, "bf16"), lambda: CANDIDATES, ran.append) is CANDIDATES[0]
    assert set(json.loads(path.read_text())) == {"FWD|256|bf16", "FWD|512|bf16"}


def test_a_changed_source_or_gpu_is_tuned_again(cache, monkeypatch):
    monkeypatch.setattr(tuning, "bench", Timer([3.0, 1.0, 2.0, 1.0, 2.0, 3.0]))
    tuning.pick("FWD", (1,), lambda: CANDIDATES, lambda c: None)
    tuning.forget()
    monkeypatch.setattr(tuning, "_source_hash", "0123456789ab")     # an edited kernel
    assert tuning.pick("FWD", (1,), lambda: CANDIDATES, lambda c: None) is CANDIDATES[0]
    assert len(list(cache.glob("*.json"))) == 2


def test_an_unreadable_file_is_tuned_over_and_off_keeps_nothing(cache, monkeypatch, tmp_path):
    path = tuning.cache_file()
    path.write_text("{not json")
    monkeypatch.setattr(tuning, "bench", Timer([2.0, 1.0, 3.0]))
    assert tuning.pick("FWD", (1,), lambda: CANDIDATES, lambda c: None) is CANDIDATES[1]
    assert json.loads(path.read_text()) == {"FWD|1": dict(BLOCK=32, num_warps=4, num_stages=1,
                                                          maxnreg=None)}
    tuning.forget()
    with settings.override(tune_cache="off"):
        assert tuning.cache_file() is None
        monkeypatch.setattr(tuning, "bench", Timer([2.0, 3.0, 1.0]))
        assert tuning.pick("FWD", (2,), lambda: CANDIDATES, lambda c: None) is CANDIDATES[2]
    assert "FWD|2" not in json.loads(path.read_text())


def test_the_first_timing_is_announced_once_and_counted(cache, monkeypatch, capsys):
    """A process that times candidates says so on stderr once, with where the picks are kept;
    stats() counts picks timed and read."""
    monkeypatch.setattr(tuning, "bench", Timer([3.0, 1.0, 2.0, 2.0, 1.0, 3.0]))
    tuning.pick("FWD", (1,), lambda: CANDIDATES, lambda c: None)
    tuning.pick("FWD", (2,), lambda: CANDIDATES, lambda c: None)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and str(tuning.cache_file()) in lines[0]
    stats = tuning.stats()
    assert (stats["timed"], stats["read"]) == (2, 0) and stats["seconds"] >= 0
    tuning.forget()                                  # as a new process: both from the file
    tuning.pick("FWD", (1,), lambda: CANDIDATES, lambda c: None)
    tuning.pick("FWD", (2,), lambda: CANDIDATES, lambda c: None)
    assert (tuning.stats()["timed"], tuning.stats()["read"]) == (0, 2)
    assert capsys.readouterr().err == ""


def test_a_candidate_that_does_not_compile_is_skipped(cache, monkeypatch):
    def run(config):
        if config.kwargs["BLOCK"] == 16:
            raise triton.OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(tuning, "bench", lambda fn: (fn(), 1.0)[1])
    assert tuning.pick("FWD", (1,), lambda: CANDIDATES, run) is CANDIDATES[1]


@pytest.mark.skipif(torch.cuda.is_available() or not settings.interpreting(),
                    reason="the interpreter stands in for the GPU's tuned launches")
def test_tuned_calls_time_whole_passes_and_agree_with_the_reference(cache, monkeypatch):
    """With tuning on (under the interpreter, with the stand-in timer): the forward's candidates
    are timed on its launch, the backward's data-kernel candidates each on a whole backward
    (every gradient made, GEMMs included), and the picks give the reference's numbers."""
    monkeypatch.setattr(kernels, "_use_triton", lambda input: True)
    monkeypatch.setattr(settings, "interpreting", lambda: False)     # else configs.INTERPRETER
    monkeypatch.setattr(settings, "autotune", lambda: True)
    timed, passes = [], []

    def stand_in(fn):
        fn()
        timed.append(fn)
        return 100.0 - len(timed)                     # the last candidate is the fastest

    monkeypatch.setattr(tuning, "bench", stand_in)
    whole = backward.d2conv_bwd

    def counted(*args, **kwargs):
        passes.append(kwargs.get("data_config"))
        return whole(*args, **kwargs)

    monkeypatch.setattr(backward, "d2conv_bwd", counted)
    case = Case(N=1, C=16, Co=16, T=2, H=3, W=4, mode="xyz")
    inputs = make_inputs(case)
    out = apply(case, *inputs)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)
    ref_out, ref_grads = reference(case, inputs, grad_out)
    assert rel_err(out, ref_out) < 1e-4
    for g, ref in zip(grads, [r for r in ref_grads if r is not None]):
        assert rel_err(g, ref) < 1e-4
    fwd = len(configs.candidates("FWD", dict(x_ptr=inputs[0], Cog=16, SEG=16,
                                              DOT_PRECISION="ieee")))
    data = len([k for k in tuning._memory if k[0] == "BWD_DATA"])
    assert data == 1 and fwd > 1, (list(tuning._memory), len(timed), passes)
    # the outer backward, then one whole backward per data-kernel candidate (its config given)
    assert passes[0] is None and len(passes) == 1 + len(timed) - fwd
    assert all(config is not None for config in passes[1:])
    picked = tuning._memory[next(k for k in tuning._memory if k[0] == "BWD_DATA")]
    assert picked == passes[-1]                       # the last timed, the stand-in's fastest


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles for the GPU")
def test_candidates_are_compiled_ahead_and_the_pick_agrees(cache, monkeypatch):
    """On a GPU every candidate of a new shape is compiled (on a pool of threads) before the
    first is timed, and the tuned forward and backward equal the reference."""
    from kernels import forward

    def compiled():
        return sum(len(caches[0]) for caches in forward.d2conv_fwd_kernel.device_caches.values())

    monkeypatch.setattr(tuning, "_compile_ahead", COMPILE_AHEAD)       # the fixture's stub off
    for caches in forward.d2conv_fwd_kernel.device_caches.values():
        caches[0].clear()           # what other tests compiled in this process: compiled anew
    before, at_first_timing = compiled(), []
    real_bench = tuning.bench

    def spy(fn):
        if not at_first_timing:
            at_first_timing.append(compiled())
        return real_bench(fn)

    monkeypatch.setattr(tuning, "bench", spy)
    case = Case(N=1, C=40, Co=48, T=2, H=6, W=7, mode="xyz")
    inputs = make_inputs(case)
    with settings.override(autotune=True, forward="triton"):
        out = apply(case, *inputs)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)
    assert at_first_timing and at_first_timing[0] - before >= 2
    assert compiled() == at_first_timing[0]          # nothing was left to compile while timing
    ref_out, ref_grads = reference(case, inputs, grad_out)
    assert rel_err(out, ref_out) < 1e-4
    for g, ref in zip(grads, [r for r in ref_grads if r is not None]):
        assert rel_err(g, ref) < 1e-4
