"""Data for training and evaluation: DAVIS / YouTube-VOS sequences, a procedural synthetic
dataset in the DAVIS layout, and the clip datasets that feed the model.

    build_clips("synthetic", "train", size=None, augment=True)  ->  ClipDataset
    sample["clip"] (3, T, H', W') float32, ["target"] (1, T, H', W'), ["valid"] (1, T, H', W') bool
"""
from pathlib import Path

from .clips import ClipDataset, WeightedMix, sample_frames
from .davis import Sequence, davis_sequences, load_frame, load_mask
from .youtube_vos import youtube_vos_sequences

__all__ = ["Sequence", "davis_sequences", "load_frame", "load_mask", "youtube_vos_sequences",
           "ClipDataset", "WeightedMix", "sample_frames", "generate_synthetic",
           "ensure_synthetic", "SPLITS", "build_clips"]


def __getattr__(name):
    # the synthetic module is imported on demand, so that `python -m d2conv.data.synthetic`
    # does not find it already imported by this package
    if name in ("generate_synthetic", "ensure_synthetic"):
        from . import synthetic
        return getattr(synthetic, name.removesuffix("_synthetic"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# (year, image-set name) of each split (SPEC §4): train on DAVIS-2017 train, validate on
# DAVIS-2016 val. The synthetic dataset writes the same lists for both years.
SPLITS = {"train": (2017, "train"), "val": (2016, "val")}


def build_clips(data, split: str, clip_len=8, size=None, augment=False, seed=0) -> ClipDataset:
    """Clips of ``split`` ("train" or "val") from ``data``: "synthetic" (generated on first use in
    ``data/synthetic``) or the path of a DAVIS root. Raises FileNotFoundError naming what a DAVIS
    root lacks."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    year, name = SPLITS[split]
    if str(data) == "synthetic":
        from .synthetic import ensure
        root = ensure("data/synthetic")
    else:
        root = Path(data)
        for need in (root, root / "JPEGImages" / "480p", root / "ImageSets" / str(year)):
            if not need.is_dir():
                raise FileNotFoundError(f"not a DAVIS root: no folder {need}")
    sequences = davis_sequences(root, name, year=year)
    return ClipDataset(sequences, clip_len=clip_len, size=size, augment=augment, seed=seed)
