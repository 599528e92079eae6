"""Autotuning of the D²Conv kernels: each candidate timed on the whole pass it serves, the pick
remembered on disk.

    config = tuning.pick("BWD_DATA", key, candidates, run)   # run(config): one whole pass

Triton's autotuner times one kernel alone, on one launch; the backward's data kernel runs once a
chunk of kernel points between two cuBLAS GEMMs, and the tile that is fastest alone was slower in
the whole backward (2D det64 on an H200, 2026-12-02: 2.24 ms tuned against 1.56 with the best tile
pinned). So ``pick`` times ``run(config)``, a whole forward or a whole backward with that config
pinned, for every candidate (``triton.testing.do_bench``, median), and keeps the fastest.

Picks are kept in memory and in one JSON file per GPU model, Triton version and kernel source
(``cache_file``: a hash of this package's sources, so an edited kernel is tuned again) in
``settings.tune_cache()`` (``D2CONV_TUNE_CACHE``; "off" keeps nothing on disk), so a second
process tunes nothing the first did. The file maps "<kernel>|<key>" to the config; a file that
cannot be read is tuned over and rewritten; writes are atomic.

Tuning a new shape costs the candidates' compiles, seconds each, so they are compiled on a pool of
threads before any is timed (``launch`` compiles instead of launching meanwhile; Triton compiles
largely outside the GIL: four data-kernel candidates for sm_90 took 14.0 s on two threads against
21.2 s one after the other, 2-core AMD EPYC, Triton 3.9). The first time a process times
candidates it says so on stderr, once; ``stats()`` counts what was timed and read.
"""
import hashlib
import inspect
import json
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import settings

__all__ = ["pick", "launch", "cache_file", "source_hash", "forget", "stats"]

_memory = {}            # (kernel, key) -> config, this process's picks
_loaded = {}            # cache file -> its picks as read ({} when missing or unreadable)
_stats = dict(timed=0, read=0, seconds=0.0)     # this process's picks: timed, read from the file
_compiling = False      # True while pick compiles the candidates ahead of timing them


def source_hash():
    """12 hex digits of the hash of this package's Python sources."""
    global _source_hash
    if _source_hash is None:
        digest = hashlib.sha256()
        for path in sorted(Path(__file__).parent.glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
        _source_hash = digest.hexdigest()[:12]
    return _source_hash


_source_hash = None


def cache_file():
    """The JSON file of this GPU, Triton version and kernel source, or None (not kept on disk)."""
    folder = settings.tune_cache()
    if folder is None:
        return None
    import triton

    gpu = re.sub(r"[^A-Za-z0-9._-]+", "_", torch.cuda.get_device_name())
    return folder / f"{gpu}-triton{triton.__version__}-{source_hash()}.json"


def forget():
    """Drop this process's picks and the files read (the next pick reads the disk again)."""
    _memory.clear()
    _loaded.clear()
    _stats.update(timed=0, read=0, seconds=0.0)


def stats():
    """This process's picks so far: dict(timed=how many were timed, seconds=spent timing them,
    compiles included, read=how many came from the cache file, file=its path or None)."""
    return dict(_stats, file=cache_file() if torch.cuda.is_available() else None)


def _announce(path):
    """One line on stderr before the first candidates this process times."""
    if _stats["timed"] == 0:
        where = f"kept in {path}" if path is not None else "not kept: D2CONV_TUNE_CACHE=off"
        print(f"d2conv: tuning the kernels for new shapes on this GPU, a few seconds each ({where}"
              f"; D2CONV_AUTOTUNE=0 skips it)", file=sys.stderr, flush=True)


def _to_dict(config):
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
                maxnreg=config.maxnreg)


def _same(config, entry):
    return _to_dict(config) == entry


def _read(path):
    if path not in _loaded:
        try:
            _loaded[path] = json.loads(path.read_text())
            if not isinstance(_loaded[path], dict):
                _loaded[path] = {}
        except (OSError, ValueError):
            _loaded[path] = {}
    return _loaded[path]


def _write(path, name, entry):
    """Add one pick to the file: read it again (another process may have added picks), add,
    replace it in one step. A folder that cannot be written keeps the pick in memory only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            picks = json.loads(path.read_text())
        except (OSError, ValueError):
            picks = {}
        if not isinstance(picks, dict):
            picks = {}
        picks[name] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(picks, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
        _loaded[path] = picks
    except OSError:
        pass


def bench(fn):
    """Median ms of ``fn`` on the GPU (short: tuning runs every candidate once per shape)."""
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def launch(kernel_fn, grid, **kwargs):
    """``kernel_fn[grid](**kwargs)``: how a tuned kernel is launched. While ``pick`` compiles the
    candidates ahead, the compile is handed to its pool instead, and nothing runs."""
    if _compiling:
        kernel_fn.warmup(grid=grid, **kwargs)
    else:
        kernel_fn[grid](**kwargs)


def _compile_ahead(candidates, run):
    """Compile what ``run(config)`` launches, for every candidate, on a pool of threads: each run
    only submits its kernels' compiles (``launch``); Triton's AsyncCompileMode keeps them and
    installs the compiled kernels when the pool is done. Where this Triton has no
    AsyncCompileMode, or anything here fails, the candidates compile as they are timed."""
    global _compiling
    workers = min(len(candidates), os.cpu_count() or 1)
    if workers < 2 or not torch.cuda.is_available():      # the interpreter compiles nothing
        return
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    # where it can, a compile error leaves the other candidates' kernels installed (Triton 3.9)
    options = ({"ignore_errors": True}
               if "ignore_errors" in inspect.signature(AsyncCompileMode).parameters else {})
    try:
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, **options):
            _compiling = True
            try:
                for config in candidates:
                    run(config)
            finally:
                _compiling = False
    except Exception:       # a candidate that does not compile: found again, and skipped, below
        pass


def pick(kernel, key, candidates, run):
    """The config among ``candidates()`` (triton.Configs; called on a miss only) under which
    ``run(config)`` is fastest, for this ``kernel`` name and ``key`` (a tuple of what the pick
    depends on): from memory, else from the cache file, else timed now and kept in both. A
    candidate that fails to compile (too many registers or too much shared memory for this GPU)
    is skipped."""
    import triton

    found = _memory.get((kernel, key))          # a call's cost once tuned: this lookup
    if found is not None:
        return found
    name = f"{kernel}|{'|'.join(map(str, key))}"
    candidates = candidates()
    path = cache_file()
    if len(candidates) == 1:
        best = candidates[0]
    else:
        entry = _read(path).get(name) if path is not None else None
        best = next((c for c in candidates if entry is not None and _same(c, entry)), None)
        _stats["read"] += best is not None
        if best is None:
            _announce(path)
            start, times = time.perf_counter(), []
            _compile_ahead(candidates, run)
            for config in candidates:
                try:
                    times.append(bench(lambda: run(config)))
                except (triton.OutOfResources, triton.CompilationError,
                        triton.runtime.errors.PTXASError):
                    times.append(math.inf)
            best = candidates[min(range(len(times)), key=times.__getitem__)]
            _stats["timed"] += 1
            _stats["seconds"] += time.perf_counter() - start
            if path is not None:
                _write(path, name, _to_dict(best))
    _memory[kernel, key] = best
    return best
