"""DAVIS sequences (SPEC §6) and the frame / mask readers shared by every dataset.

    ROOT/ImageSets/<year>/<split>.txt                 one sequence name a line
    ROOT/JPEGImages/480p/<seq>/00000.jpg ...          RGB frames
    ROOT/Annotations_unsupervised/480p/<seq>/*.png    instance ids (fallback: Annotations/480p)

The salient-object mask is the union of all instance ids != 0 (SPEC §4). Readers open and close
the file on every call, so a dataset holding :class:`Sequence` objects is safe in DataLoader
workers.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Sequence", "davis_sequences", "load_frame", "load_mask", "annotation_dir"]


@dataclass
class Sequence:
    """One video: its frame files in order and, aligned with them, the mask files (``None`` where
    a frame has no annotation)."""
    name: str
    frames: list[Path]
    masks: list[Path | None]

    def __len__(self):
        return len(self.frames)


def _open(path) -> Image.Image:
    """The decoded image at ``path``; FileNotFoundError / ValueError naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def load_frame(path) -> np.ndarray:
    """RGB frame as uint8 (H, W, 3)."""
    return np.asarray(_open(path).convert("RGB"))


def load_mask(path) -> np.ndarray:
    """Foreground as bool (H, W): ids != 0 of a palette PNG, != 0 of a grayscale one (0/255),
    non-black pixels of an RGB(A) one."""
    image = _open(path)
    if image.mode in ("RGB", "RGBA"):
        return np.asarray(image.convert("RGB")).any(axis=2)
    if image.mode in ("LA", "PA"):
        image = image.getchannel(0)
    if image.mode not in ("P", "L", "1", "I", "I;16", "F"):
        raise ValueError(f"unsupported mask mode {image.mode!r}: {path}")
    return np.asarray(image) != 0


def annotation_dir(root) -> Path:
    """``ROOT/Annotations_unsupervised/480p``, or ``ROOT/Annotations/480p`` when the former
    does not exist."""
    root = Path(root)
    unsupervised, semi = root / "Annotations_unsupervised" / "480p", root / "Annotations" / "480p"
    if unsupervised.is_dir():
        return unsupervised
    if semi.is_dir():
        return semi
    raise FileNotFoundError(f"no annotation folder: neither {unsupervised} nor {semi} exists")


def read_names(list_file) -> list[str]:
    """Sequence names of an image-set file, one a line (blank lines ignored)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"no image set file: {list_file}")
    return [line.strip() for line in list_file.read_text().splitlines() if line.strip()]


def davis_sequences(root, split: str, year: int = 2017) -> list[Sequence]:
    """The sequences listed in ``ROOT/ImageSets/<year>/<split>.txt``, every frame annotated.

    Raises FileNotFoundError naming a missing list, folder or empty folder, and ValueError when a
    sequence's frame and mask files differ (count or names)."""
    root = Path(root)
    names = read_names(root / "ImageSets" / str(year) / f"{split}.txt")
    image_root, mask_root = root / "JPEGImages" / "480p", annotation_dir(root)
    sequences = []
    for name in names:
        image_dir, mask_dir = image_root / name, mask_root / name
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"sequence {name!r}: no folder {folder}")
        frames, masks = sorted(image_dir.glob("*.jpg")), sorted(mask_dir.glob("*.png"))
        if not frames:
            raise FileNotFoundError(f"sequence {name!r}: no .jpg frames in {image_dir}")
        if len(frames) != len(masks):
            raise ValueError(f"sequence {name!r}: {len(frames)} frames in {image_dir} but "
                             f"{len(masks)} masks in {mask_dir}")
        for frame, mask in zip(frames, masks):
            if frame.stem != mask.stem:
                raise ValueError(f"sequence {name!r}: frame {frame} has no mask "
                                 f"{mask_dir / (frame.stem + '.png')}")
        sequences.append(Sequence(name, frames, list(masks)))
    return sequences
