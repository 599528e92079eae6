"""Import of the VMZ (Caffe2) ir-CSN weights into ``d2conv.backbones.IrCSN``.

The model zoo pickle (e.g. ``irCSN_152_ft_kinetics_from_sports1m_f101599884.pkl``) holds
``{"blobs": {name: float32 array}}``; the arrays already have PyTorch's layouts (a depthwise
kernel is (C, 1, 3, 3, 3)). Blocks are numbered 0, 1, ... across all stages:

    conv1_w, conv1_spatbn_relu_{s,b,rm,riv}                      stem conv, BN
    comp_{i}_conv_{1,3,4}_w, comp_{i}_spatbn_{1,3,4}_{s,b,rm,riv}  conv1/conv2/conv3 and their BNs
    shortcut_projection_{i}_w, shortcut_projection_{i}_spatbn_*  first block of each stage
    last_out_L400_{w,b}                                          Kinetics classifier (unused)

BN suffixes s, b, rm, riv are weight, bias, running mean, running variance. Every other blob is
used exactly once. Convert once with

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

__all__ = ["DEPTHS", "UNUSED_PREFIX", "blob_map", "convert", "load_caffe2_pickle",
           "load_backbone_weights", "main"]

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


def load_caffe2_pickle(path) -> dict:
    """Read a VMZ pickle: ``pickle.load(f, encoding="latin1")["blobs"]`` -> {name: array}."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except OSError as e:
        raise FileNotFoundError(f"cannot read weights file {os.fspath(path)!r}: {e}") from e
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not a readable Caffe2 pickle: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("blobs"), dict):
        raise ValueError(f"{os.fspath(path)!r} has no 'blobs' dict (is it a VMZ Caffe2 pickle?)")
    return data["blobs"]


def load_backbone_weights(model: IrCSN, path) -> IrCSN:
    """Load a Caffe2 pickle or a converted ``torch.save``d state dict into ``model`` strictly."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file {os.fspath(path)!r} not found")
    if zipfile.is_zipfile(path):                      # torch.save's format
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = convert(load_caffe2_pickle(path), model)
    model.load_state_dict(state, strict=True)
    return model


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
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
