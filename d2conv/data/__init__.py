"""Data for training and evaluation: DAVIS (either layout) and YouTube-VOS sequences, a procedural
synthetic set in the DAVIS layout, and the clip datasets that feed the model.

    root = dataset_root("synthetic")                      # or a DAVIS root
    build_clips(root, "train")  ->  ClipDataset: sample["clip"] (3, T, H', W') float32,
                                    ["target"] (1, T, H', W'), ["valid"] (1, T, H', W') bool
    split_sequences(root, "val")  ->  the validation videos with their DAVIS-2016 ground truth
"""
from pathlib import Path

from ..errors import MissingInput
from .clips import ClipDataset, WeightedMix, sample_frames
from .davis import Sequence, check_files, davis_sequences, load_frame, load_mask, read_frames
from .youtube_vos import youtube_vos_sequences

__all__ = ["Sequence", "davis_sequences", "load_frame", "read_frames", "load_mask", "check_files",
           "youtube_vos_sequences", "ClipDataset", "WeightedMix", "sample_frames", "SPLITS",
           "dataset_root", "split_sequences", "build_clips"]

# (year, image set, masks) of each split (docs/training.md): train on DAVIS-2017 train with the
# union of the unsupervised instances, validate on DAVIS-2016 val against its own ground truth.
# The DAVIS-2016 release has one list per split (ImageSets/480p), used whatever the year.
SPLITS = {"train": (2017, "train", "training"), "val": (2016, "val", "davis2016")}


def dataset_root(data, synthetic=None) -> Path:
    """The folder ``data`` names: "synthetic" is the procedural set with the parameters
    ``synthetic`` (a dict for ``synthetic.ensure``; written on first use), anything else a DAVIS
    root, which must exist."""
    if str(data) == "synthetic":
        from .synthetic import ensure          # imported here: `python -m` runs that module
        return ensure(**(synthetic or {}))
    root = Path(data)
    if not root.is_dir():
        raise MissingInput(f"no such dataset folder: {root} (give a DAVIS root, or 'synthetic')")
    return root


def split_sequences(root, split: str):
    """The sequences of ``split`` ("train" or "val") of a DAVIS root, with that split's masks."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    year, name, masks = SPLITS[split]
    return davis_sequences(root, name, year=year, masks=masks)


def build_clips(root, split: str, **options) -> ClipDataset:
    """Clips of ``split`` of a DAVIS root; ``options`` go to ClipDataset."""
    return ClipDataset(split_sequences(root, split), **options)
