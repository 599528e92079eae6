"""Where the bench writes its records: bench/results/, or the folder named by
D2CONV_BENCH_RESULTS (read here only; e.g. a scratch folder for a trial run, to keep the
repository's records as they are). One JSON file per card and kind of measurement."""
import json
import os
from pathlib import Path

RESULTS = Path(os.environ.get("D2CONV_BENCH_RESULTS") or Path(__file__).parent / "results")


def gpu_name():
    """The GPU's name as the results files spell it, e.g. "NVIDIA_H200"."""
    import torch

    return torch.cuda.get_device_name().replace(" ", "_")


def commit():
    """The code measured, as records name it: $D2CONV_COMMIT (a copy of the tree without its git
    history), else git's short HEAD, else ""."""
    import subprocess

    if os.environ.get("D2CONV_COMMIT"):
        return os.environ["D2CONV_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return ""


def write(name, data):
    """Write ``data`` as RESULTS/name (JSON), replacing the file in one step."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def record_timing(name, entry):
    """Merge one timing (shape, dtype, op, pass, ...) into RESULTS/<gpu><name>, in place of an
    earlier one of the same case, with the card, the software and how the kernels were configured
    (autotuned; any config pinned through kernels.settings)."""
    import torch
    import triton

    from kernels import settings

    gpu = gpu_name()
    pinned = {kernel: settings.pinned_config(kernel)
              for kernel in ("FWD", "FWD_HOPPER", "BWD_DATA", "BWD_INPUT")
              if settings.pinned_config(kernel)}
    merge(f"{gpu}{name}", dict(gpu=gpu, **entry, torch=torch.__version__,
                               triton=triton.__version__, autotuned=settings.autotune(),
                               **({"pinned": pinned} if pinned else {})),
          key=("shape", "dtype", "op", "pass"))


def merge(name, row, key):
    """Put ``row`` into the list of rows in RESULTS/name, in place of the row with the same values
    of the ``key`` fields; the other rows stay. Rows are kept sorted by key."""
    path = RESULTS / name
    rows = json.loads(path.read_text()) if path.exists() else []
    def of(r):      # a row of an older record may lack a later key field
        return tuple(str(r.get(k, "")) for k in key)

    rows = [r for r in rows if of(r) != of(row)] + [row]
    return write(name, sorted(rows, key=of))
