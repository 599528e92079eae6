"""Kernel settings that code can set over their environment variables (no Triton import here).

    kernels.set_autotune(False)     # each kernel's default config, whatever D2CONV_AUTOTUNE says

The variables stay the way to set them from outside a program; a setting made here wins.
"""
import os

__all__ = ["set_autotune", "autotune"]

_AUTOTUNE = None          # set_autotune's choice; None: the environment decides


def set_autotune(enabled):
    """Tune every kernel per shape (True), or launch each kernel's default config (False: no
    tuning, one compile per kernel and shape, what a short run wants); None hands the choice back
    to D2CONV_AUTOTUNE."""
    global _AUTOTUNE
    _AUTOTUNE = None if enabled is None else bool(enabled)


def autotune() -> bool:
    """Whether the kernels tune per shape: set_autotune's choice, else D2CONV_AUTOTUNE (default 1)."""
    if _AUTOTUNE is not None:
        return _AUTOTUNE
    return os.environ.get("D2CONV_AUTOTUNE", "1") != "0"
