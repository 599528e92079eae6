"""Every setting of the kernels, read in one place (no Triton import here).

Each setting has an environment variable, for a run steered from outside the program, and can be
set from code, which wins over the environment:

    kernels.settings.configure(autotune=False, input_grad="pull")    # until changed again
    with kernels.settings.override(config_fwd="BLOCK_M=64,BLOCK_N=128,BLOCK_C=32,num_warps=4"):
        ...                                                            # for a block only
    kernels.settings.configure(autotune=None)     # back to the environment (or the default)

  D2CONV_AUTOTUNE=1            tune each kernel per shape (default 1). 0: launch each kernel's
                               default config, one compile per kernel and shape, what a short run
                               wants. The Triton interpreter never tunes.
  D2CONV_TUNE_CACHE=DIR        where the D²Conv kernels' tuning results are kept across runs
                               (kernels/tuning.py; default $XDG_CACHE_HOME/d2conv, else
                               ~/.cache/d2conv); "off": tuned again in every process
  D2CONV_CONFIG_FWD=...        pin one config of a kernel: FWD (forward), FWD_HOPPER (the Gluon
  D2CONV_CONFIG_FWD_HOPPER=... forward, kernels/hopper.py), BWD_DATA (the backward's data
  D2CONV_CONFIG_BWD_DATA=...   kernel), BWD_INPUT (the pulled input gradient), as NAME=INT,...
  D2CONV_CONFIG_BWD_INPUT=...  e.g. "BLOCK_M=64,BLOCK_N=128,BLOCK_C=32,num_warps=4,num_stages=2"
                               (maxnreg=N caps registers per thread)
  D2CONV_GCOL_MIB=128          the most memory (MiB) the backward's columns take at once (their
                               gradient, then the sampled columns); at least one kernel point's
  D2CONV_FP32_DOT=ieee         the forward's product for strict fp32 inputs (TF32 not allowed
                               by PyTorch): ieee (FMA on the CUDA cores) or tf32x3 (three TF32
                               products on the tensor cores, as accurate)
  D2CONV_INPUT_GRAD=auto       the input gradient of D²Conv modes: scatter (fp32 atomics), pull
                               (no atomics, kernels/input_grad.py) or auto (pull in
                               deterministic mode only)
  D2CONV_FORWARD=auto          the forward's kernel: gluon (kernels/hopper.py: bf16/fp16 on an
                               sm_90 GPU), triton (kernels/forward.py, every dtype and GPU) or
                               auto (gluon where it takes the call and was tested with the
                               installed Triton, else triton)
"""
import contextlib
import os

__all__ = ["configure", "override", "set_autotune", "autotune", "tune_cache", "pinned_config",
           "gcol_bytes", "fp32_dot", "input_grad", "forward", "interpreting", "SETTINGS"]

# name: default; the environment variable is "D2CONV_" + NAME
SETTINGS = {"autotune": "1", "tune_cache": "", "config_fwd": "", "config_fwd_hopper": "",
            "config_bwd_data": "", "config_bwd_input": "", "gcol_mib": "128", "fp32_dot": "ieee",
            "input_grad": "auto", "forward": "auto"}
_CHOICES = {"fp32_dot": ("ieee", "tf32x3"), "input_grad": ("auto", "scatter", "pull"),
            "forward": ("auto", "triton", "gluon")}

_overrides = {}     # set from code: name -> text


def variable(name):
    """The environment variable of a setting."""
    return "D2CONV_" + name.upper()


def _text(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def configure(**values):
    """Set settings from code (``autotune=False``, ``input_grad="pull"``, ``gcol_mib=64``,
    ``config_fwd="..."``); None hands a setting back to its environment variable."""
    for name, value in values.items():
        if name not in SETTINGS:
            raise ValueError(f"unknown kernel setting {name!r}; known: {', '.join(SETTINGS)}")
        if value is None:
            _overrides.pop(name, None)
        else:
            _overrides[name] = _text(value)


@contextlib.contextmanager
def override(**values):
    """``configure(**values)`` for the duration of a with block, then the settings as before."""
    saved = {name: _overrides.get(name) for name in values}
    configure(**values)
    try:
        yield
    finally:
        configure(**saved)


def set_autotune(enabled):
    """Tune every kernel per shape (True) or launch each kernel's default config (False); None
    hands the choice back to D2CONV_AUTOTUNE."""
    configure(autotune=None if enabled is None else bool(enabled))


def _get(name):
    """A setting's text: set from code, else its environment variable, else its default."""
    if name in _overrides:
        return _overrides[name]
    return os.environ.get(variable(name)) or SETTINGS[name]


def _choice(name):
    value = _get(name)
    if value not in _CHOICES[name]:
        raise ValueError(f"{variable(name)} must be one of {', '.join(_CHOICES[name])}, "
                         f"got {value!r}")
    return value


def interpreting() -> bool:
    """Whether Triton runs its kernels under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune() -> bool:
    """Whether the kernels tune per shape."""
    return _get("autotune") != "0"


def tune_cache():
    """The folder of the tuning results (a Path), or None when they are not kept on disk."""
    from pathlib import Path

    text = _get("tune_cache")
    if text == "off":
        return None
    if text:
        return Path(text).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "d2conv"


def pinned_config(kernel):
    """The pinned config text of FWD, BWD_DATA or BWD_INPUT, or None."""
    return _get("config_" + kernel.lower()) or None


def gcol_bytes() -> int:
    """The most bytes of columns the backward holds at once."""
    text = _get("gcol_mib")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{variable('gcol_mib')} must be a positive number of MiB, got {text!r}")
    return int(text) * 2**20


def fp32_dot() -> str:
    """The forward's product for strict fp32: "ieee" or "tf32x3"."""
    return _choice("fp32_dot")


def input_grad() -> str:
    """How D²Conv's input gradient is made: "auto", "scatter" or "pull"."""
    return _choice("input_grad")


def forward() -> str:
    """The forward's kernel: "auto", "triton" or "gluon"."""
    return _choice("forward")
