"""Trainer checkpoints: read without running anything in them, and loaded strictly.

    state = load_checkpoint("runs/x/best.pt")    # model, optimizer, scheduler, rng, config, ...
    load_weights(model, state["model"], "runs/x/best.pt")

A checkpoint is a pickle, and a pickle can name any function to call while it is read; a
downloaded ``best.pt`` could run a command. ``torch.load(..., weights_only=True)`` resolves only
tensors and plain containers, strings and numbers, which is all the trainer stores
(``d2conv.trainer``: the RNG states as plain values). Checkpoints written before that hold numpy's
RNG state as an array; the numpy names that rebuild an array, a scalar or a dtype from bytes
(``NUMPY_GLOBALS``) are allowed too, so they still load. A file naming anything else is refused
in one line naming the file and what it asked for; nothing in it runs.
"""
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput, MissingInput, first_line

try:
    from numpy._core import multiarray as numpy_multiarray          # numpy 2
except ImportError:
    from numpy.core import multiarray as numpy_multiarray           # numpy 1

__all__ = ["NUMPY_GLOBALS", "numpy_multiarray", "load_checkpoint", "load_weights"]

# numpy 1 pickles name the module numpy.core.multiarray, numpy 2 pickles numpy._core.multiarray;
# numpy >= 1.25 builds a dtype as an instance of its class in numpy.dtypes
NUMPY_GLOBALS = [numpy_multiarray._reconstruct, numpy_multiarray.scalar, np.ndarray, np.dtype,
                 (numpy_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                 (numpy_multiarray.scalar, "numpy.core.multiarray.scalar"),
                 *(getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", None))
                   if name.endswith("DType"))]


def load_checkpoint(path) -> dict:
    """A trainer checkpoint's contents (tensors on the CPU); MissingInput / BadInput naming the
    file otherwise, also for a pickle that names a function or class beyond tensors, plain values
    and numpy arrays (refused before anything in it runs)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"no checkpoint {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"'{found.group(1)}'" if found else "more than tensors and plain values"
        raise BadInput(f"{path} is refused: its pickle asks for {what}, which a trainer "
                       f"checkpoint never holds and which could run code; nothing in it ran"
                       ) from None
    except Exception as error:
        raise BadInput(f"cannot read the checkpoint {path}: "
                       f"{first_line(error) or type(error).__name__}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise BadInput(f"{path} is not a trainer checkpoint (no 'model' and 'config')")
    if not isinstance(state["config"], dict):
        raise BadInput(f"{path}: its 'config' is not a dict")
    return state


def load_weights(model, state, path):
    """``model.load_state_dict(state)``, strictly; BadInput naming ``path`` and what differs (the
    first missing, unexpected and differently shaped tensors) when ``state`` is another model's."""
    own = model.state_dict()
    if not isinstance(state, dict):
        raise BadInput(f"{path}: its weights are a {type(state).__name__}, not a state dict")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in own
              if k in state and getattr(state[k], "shape", None) != own[k].shape]
    parts = [f"{len(names)} {what}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
             for what, names in (("missing", missing), ("unexpected", unexpected),
                                 ("of another shape", shapes)) if names]
    if parts:
        raise BadInput(f"{path} holds another model's weights ({len(own)} tensors expected): "
                       + "; ".join(parts))
    model.load_state_dict(state)
    return model
