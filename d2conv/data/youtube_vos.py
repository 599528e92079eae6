"""YouTube-VOS sequences (docs/davis.md): sparse annotations, every 5th frame.

    ROOT/<split>/JPEGImages/<vid>/00000.jpg 00005.jpg ...
    ROOT/<split>/Annotations/<vid>/00000.png 00005.png ...   palette PNGs, instance ids

Masks are aligned with the frames by file stem, ``None`` where a frame has no PNG; the clip
dataset marks those frames not valid for the loss.
"""
from pathlib import Path

from .davis import Sequence

__all__ = ["youtube_vos_sequences"]


def youtube_vos_sequences(root, split: str = "train") -> list[Sequence]:
    """Every video under ``ROOT/<split>/JPEGImages`` (sorted by name).

    Raises FileNotFoundError naming a missing folder, ValueError naming a video whose
    annotation folder holds no PNG or a PNG with no frame of the same name."""
    base = Path(root) / split
    image_root, mask_root = base / "JPEGImages", base / "Annotations"
    for folder in (image_root, mask_root):
        if not folder.is_dir():
            raise FileNotFoundError(f"not a YouTube-VOS root: no folder {folder}")
    sequences = []
    for image_dir in sorted(p for p in image_root.iterdir() if p.is_dir()):
        mask_dir = mask_root / image_dir.name
        if not mask_dir.is_dir():
            raise FileNotFoundError(f"video {image_dir.name!r}: no folder {mask_dir}")
        frames = sorted(image_dir.glob("*.jpg"))
        if not frames:
            raise FileNotFoundError(f"video {image_dir.name!r}: no .jpg frames in {image_dir}")
        masks = {p.stem: p for p in mask_dir.glob("*.png")}
        if not masks:
            raise ValueError(f"video {image_dir.name!r}: no .png annotation in {mask_dir}")
        orphans = sorted(set(masks) - {f.stem for f in frames})
        if orphans:
            raise ValueError(f"video {image_dir.name!r}: annotation {masks[orphans[0]]} has no "
                             f"frame {image_dir / (orphans[0] + '.jpg')}")
        sequences.append(Sequence(image_dir.name, frames, [masks.get(f.stem) for f in frames]))
    return sequences
