"""Import of the VMZ (Caffe2) ir-CSN weights into ``d2conv.backbones.IrCSN``.

The model zoo pickle (e.g. ``irCSN_152_ft_kinetics_from_sports1m_f101599884.pkl``) holds
``{"blobs": {name: float32 array}}``; the arrays already have PyTorch's layouts (a depthwise
kernel is (C, 1, 3, 3, 3)). Blocks are numbered 0, 1, ... across all stages:

    conv1_w, conv1_spatbn_relu_{s,b,rm,riv}                      stem conv, BN
    comp_{i}_conv_{1,3,4}_w, comp_{i}_spatbn_{1,3,4}_{s,b,rm,riv}  conv1/conv2/conv3 and their BNs
    shortcut_projection_{i}_w, shortcut_projection_{i}_spatbn_*  first block of each stage
    last_out_L400_{w,b}                                          Kinetics classifier (unused)

BN suffixes s, b, rm, riv are weight, bias, running mean, running variance. Every other blob is
used exactly once. The pickle is read by ``CaffeBlobUnpickler``, which resolves only what such a
file holds (numpy arrays, dtypes and scalars), so a pickle naming anything else is refused before
any of it runs. Convert once with

    python -m d2conv.weights convert irCSN_152_...pkl weights/ir_csn_152.pt --depth 152
"""
import argparse
import os
import pickle
import tempfile
import zipfile

import numpy as np
import torch

from d2conv.backbones import BACKBONES, IrCSN
from d2conv.checkpoints import load_weights, numpy_multiarray
from d2conv.errors import BadInput, MissingInput, first_line

__all__ = ["DEPTHS", "UNUSED_PREFIX", "blob_map", "convert", "CaffeBlobUnpickler",
           "load_caffe2_pickle", "load_backbone_weights", "main"]

DEPTHS = ("152", "50")                  # the ir-CSNs of the VMZ model zoo: ir_csn_<depth>
UNUSED_PREFIX = "last_out_L400_"        # the classifier: allowed to be left over
_BN = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}


def _bn(blob_prefix: str, key_prefix: str) -> dict:
    return {f"{blob_prefix}_{s}": f"{key_prefix}.{k}" for s, k in _BN.items()}


def blob_map(model: IrCSN) -> dict:
    """{Caffe2 blob name: state-dict key of ``model``}, one entry per state-dict tensor."""
    names = {"conv1_w": "stem.conv.weight", **_bn("conv1_spatbn_relu", "stem.bn")}
    i = 0
    for s, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            key = f"stages.{s}.{j}"
            for caffe, ours in (("1", "1"), ("3", "2"), ("4", "3")):
                names[f"comp_{i}_conv_{caffe}_w"] = f"{key}.conv{ours}.weight"
                names.update(_bn(f"comp_{i}_spatbn_{caffe}", f"{key}.bn{ours}"))
            if block.shortcut_conv is not None:
                names[f"shortcut_projection_{i}_w"] = f"{key}.shortcut_conv.weight"
                names.update(_bn(f"shortcut_projection_{i}_spatbn", f"{key}.shortcut_bn"))
            i += 1
    return names


def convert(blobs: dict, model: IrCSN) -> dict:
    """Caffe2 blobs -> a state dict for ``model`` (CPU tensors in the model's dtypes).

    Raises ValueError naming a missing blob, a blob whose shape differs from the target's, or
    blobs that nothing uses (other than the ``last_out_L400_*`` classifier).
    """
    targets = model.state_dict()
    names = blob_map(model)
    missing = [b for b in names if b not in blobs]
    if missing:
        raise ValueError(f"{len(missing)} blob(s) missing from the pickle: {', '.join(missing[:10])}"
                         + (" ..." if len(missing) > 10 else ""))
    leftover = sorted(b for b in blobs if b not in names and not b.startswith(UNUSED_PREFIX))
    if leftover:
        raise ValueError(f"unexpected blob(s) left over: {', '.join(leftover)}")
    state = {}
    for blob, key in names.items():
        array, target = np.asarray(blobs[blob]), targets[key]
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(f"blob {blob!r} has shape {tuple(array.shape)}, expected "
                             f"{tuple(target.shape)} for {key}")
        state[key] = torch.tensor(array, dtype=target.dtype)
    if set(state) != set(targets):                    # a model with tensors the map does not know
        raise ValueError(f"no blob for {sorted(set(targets) - set(state))}")
    return state


class CaffeBlobUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a Caffe2 blob file holds besides plain
    containers, strings and numbers: numpy's array and scalar reconstruction, ``ndarray``, its
    dtypes, and ``_codecs.encode`` (which Python 3's protocol-2 pickles use to write bytes).
    Any other global raises UnpicklingError naming it, before anything is called."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            if module.endswith("multiarray"):          # written by numpy 1 or numpy 2
                return getattr(numpy_multiarray, name)
            return super().find_class(module, name)
        if module == "numpy.dtypes" and name.endswith("DType"):    # numpy 2's dtype classes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for '{module}.{name}', which a Caffe2 blob file "
                                     f"never holds and which could run code")


def load_caffe2_pickle(path) -> dict:
    """Read a VMZ pickle with ``CaffeBlobUnpickler`` (latin1 strings) -> {name: array};
    MissingInput / BadInput naming the file otherwise."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = CaffeBlobUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise MissingInput(f"no weights file {where}") from None
    except OSError as e:
        raise MissingInput(f"cannot read the weights file {where}: {e.strerror}") from None
    except pickle.UnpicklingError as e:
        raise BadInput(f"{where} is refused: {e}; nothing in it ran") from None
    except Exception as e:                          # truncated or not a pickle at all
        raise BadInput(f"{where} is not a readable Caffe2 pickle ({type(e).__name__}: "
                       f"{first_line(e) or 'no detail'})") from None
    if not isinstance(data, dict) or not isinstance(data.get("blobs"), dict):
        raise BadInput(f"{where} has no 'blobs' dict (is it a VMZ Caffe2 pickle?)")
    return data["blobs"]


def load_backbone_weights(model: IrCSN, path) -> IrCSN:
    """Load a Caffe2 pickle or a converted ``torch.save``d state dict into ``model`` strictly;
    MissingInput / BadInput naming the file otherwise (a trainer checkpoint, another model's
    weights, a file that is neither)."""
    where = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInput(f"no backbone weights file {where}")
    if zipfile.is_zipfile(path):                      # torch.save's format
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInput(f"{where} is not a converted backbone state dict: "
                           f"{first_line(e) or type(e).__name__}") from None
        if isinstance(state, dict) and "model" in state and "config" in state:
            raise BadInput(f"{where} is a trainer checkpoint, not backbone weights: evaluate it "
                           f"with evaluate.py --checkpoint, or go on with train.py --resume")
    else:
        try:
            blobs = load_caffe2_pickle(path)
            state = convert(blobs, model)
        except BadInput:
            raise
        except ValueError as e:
            raise BadInput(f"{where}: {e}") from None
    return load_weights(model, state, where)


def _convert_command(args) -> None:
    with torch.device("meta"):                        # only the shapes are needed
        model = BACKBONES[f"ir_csn_{args.depth}"]()
    state = convert(load_caffe2_pickle(args.src), model)
    params = {name for name, _ in model.named_parameters()}
    n_params = sum(t.numel() for k, t in state.items() if k in params)
    n_values = sum(t.numel() for t in state.values())
    dst_dir = os.path.dirname(os.path.abspath(args.dst))
    os.makedirs(dst_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst_dir, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, args.dst)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"ir-CSN-{args.depth}: wrote {len(state)} tensors, {n_params:,} parameters "
          f"({n_values:,} values with BN statistics) to {args.dst}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m d2conv.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a VMZ Caffe2 pickle to a torch state-dict file")
    conv.add_argument("src", help="the VMZ pickle, e.g. irCSN_152_ft_kinetics_from_sports1m_f101599884.pkl")
    conv.add_argument("dst", help="the torch file to write (atomically), e.g. weights/ir_csn_152.pt")
    conv.add_argument("--depth", choices=sorted(DEPTHS), default="152",
                      help="which ir-CSN the pickle holds (default: 152)")
    args = parser.parse_args(argv)
    try:
        _convert_command(args)
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
