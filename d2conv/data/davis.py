"""DAVIS sequences in either layout (docs/davis.md) and the frame / mask readers every dataset
shares.

DAVIS-2017 root (``ImageSets/<year>``: one sequence name a line):

    ROOT/ImageSets/{2016,2017}/{train,val}.txt
    ROOT/JPEGImages/480p/<seq>/00000.jpg ...
    ROOT/Annotations/480p/<seq>/00000.png ...                instance ids (palette PNGs)
    ROOT/Annotations_unsupervised/480p/<seq>/00000.png ...   the unsupervised task's instances

DAVIS-2016 release (``ImageSets/480p``: path pairs a line, the sequence is the folder in them):

    ROOT/ImageSets/480p/{train,val,trainval}.txt   "/JPEGImages/480p/bear/00000.jpg /Annotations/480p/bear/00000.png"
    ROOT/JPEGImages/480p/<seq>/00000.jpg ...
    ROOT/Annotations/480p/<seq>/00000.png ...      0 / 255

The layout is read from what the root holds. Two kinds of masks (``masks=``):

- ``"training"``: the salient object to learn, the union of the instance ids != 0 of
  ``Annotations_unsupervised/480p`` (``Annotations/480p`` where a root has no such folder).
- ``"davis2016"``: DAVIS-2016 ground truth, ``Annotations/480p`` binarised (> 0), what the
  DAVIS-2016 protocol scores against (validation and ``evaluate.py``); never
  ``Annotations_unsupervised``, whose instances differ.

Readers open and close the file on every call, so a dataset holding :class:`Sequence` objects is
safe in DataLoader workers. Every error names the path and is a :class:`d2conv.errors.InputError`.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from ..errors import BadInput, MissingInput

__all__ = ["Sequence", "davis_sequences", "load_frame", "read_frames", "load_mask", "mask_dir",
           "image_set_file", "read_image_set", "check_files", "MASKS"]

MASKS = ("training", "davis2016")


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
    """The decoded image at ``path``; MissingInput / BadInput naming it otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"cannot read image {path}: {e}") from e


def load_frame(path) -> np.ndarray:
    """RGB frame as uint8 (H, W, 3)."""
    return np.asarray(_open(path).convert("RGB"))


def read_frames(seq: Sequence, indices=None, pool=None) -> torch.Tensor:
    """Frames ``indices`` (default: all) of ``seq`` as uint8 (N, 3, H, W), decoded on ``pool``'s
    threads if given (an executor). BadInput naming two frames of different sizes."""
    paths = seq.frames if indices is None else [seq.frames[k] for k in indices]
    arrays = list(pool.map(load_frame, paths) if pool else map(load_frame, paths))
    for path, array in zip(paths, arrays):
        if array.shape != arrays[0].shape:
            raise BadInput(f"sequence {seq.name!r}: frame {path} is {array.shape[1]}x"
                           f"{array.shape[0]}, frame {paths[0]} is {arrays[0].shape[1]}x"
                           f"{arrays[0].shape[0]}")
    return rearrange(torch.from_numpy(np.stack(arrays)), "n h w c -> n c h w")


def load_mask(path) -> np.ndarray:
    """Foreground as bool (H, W): ids != 0 of a palette PNG, != 0 of a grayscale one (0/255),
    non-black pixels of an RGB(A) one."""
    image = _open(path)
    if image.mode in ("RGB", "RGBA"):
        return np.asarray(image.convert("RGB")).any(axis=2)
    if image.mode in ("LA", "PA"):
        image = image.getchannel(0)
    if image.mode not in ("P", "L", "1", "I", "I;16", "F"):
        raise BadInput(f"unsupported mask mode {image.mode!r}: {path}")
    return np.asarray(image) != 0


def mask_dir(root, masks: str = "training") -> Path:
    """The folder of ``masks`` ("training" or "davis2016") under a DAVIS root."""
    if masks not in MASKS:
        raise ValueError(f"masks must be one of {MASKS}, got {masks!r}")
    root = Path(root)
    unsupervised, annotations = (root / "Annotations_unsupervised" / "480p",
                                 root / "Annotations" / "480p")
    if masks == "training" and unsupervised.is_dir():
        return unsupervised
    if annotations.is_dir():
        return annotations
    if masks == "training":
        raise MissingInput(f"no annotation folder in the DAVIS root {root}: neither "
                           f"{unsupervised} nor {annotations}")
    raise MissingInput(f"no DAVIS-2016 ground truth in {root}: no folder {annotations}")


def image_set_file(root, split: str, year: int = 2017) -> Path:
    """The list of ``split``'s sequences: ``ImageSets/<year>/<split>.txt`` in a DAVIS-2017 root,
    ``ImageSets/480p/<split>.txt`` in the DAVIS-2016 release."""
    root = Path(root)
    by_year = root / "ImageSets" / str(year) / f"{split}.txt"
    release = root / "ImageSets" / "480p" / f"{split}.txt"
    for candidate in (by_year, release):
        if candidate.is_file():
            return candidate
    raise MissingInput(f"no image set for {split!r} in the DAVIS root {root}: neither {by_year} "
                       f"(DAVIS-2017 layout) nor {release} (DAVIS-2016 release)")


def read_image_set(path) -> list[str]:
    """Sequence names of an image-set file in order: a name a line, or the DAVIS-2016 release's
    path pairs (the sequence is the folder holding the first path's file). A name must be a
    plain folder name, so that it stays inside the root it is joined to: BadInput names the file,
    the line and what is wrong otherwise."""
    names = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {number}"
        if "/" in fields[0]:
            if ".." in Path(fields[0]).parts:
                raise BadInput(f"{where}: {fields[0]!r} leaves the DAVIS root ('..')")
            name = Path(fields[0]).parent.name
        else:
            name = fields[0]
        if name in ("", ".", "..") or "\\" in name:
            raise BadInput(f"{where}: cannot read a sequence folder name from {line!r} (a "
                           f"plain name: no '/', '\\', '.' or '..')")
        if name not in names:
            names.append(name)
    return names


def davis_sequences(root, split: str, year: int = 2017, masks: str = "training") -> list[Sequence]:
    """The sequences of ``split`` in either layout, every frame annotated, with the ``masks``
    ("training" or "davis2016", see the module docstring).

    Raises MissingInput naming a missing list, folder or empty folder, and BadInput when a
    sequence's frame and mask files differ (count or names)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"no such DAVIS root: {root}")
    image_root = root / "JPEGImages" / "480p"
    if not image_root.is_dir():
        raise MissingInput(f"not a DAVIS root: no folder {image_root}")
    names = read_image_set(image_set_file(root, split, year))
    mask_root = mask_dir(root, masks)
    sequences = []
    for name in names:
        image_dir, seq_mask_dir = image_root / name, mask_root / name
        for folder in (image_dir, seq_mask_dir):
            if not folder.is_dir():
                raise MissingInput(f"sequence {name!r}: no folder {folder}")
        frames, seq_masks = sorted(image_dir.glob("*.jpg")), sorted(seq_mask_dir.glob("*.png"))
        if not frames:
            raise MissingInput(f"sequence {name!r}: no .jpg frames in {image_dir}")
        if len(frames) != len(seq_masks):
            raise BadInput(f"sequence {name!r}: {len(frames)} frames in {image_dir} but "
                           f"{len(seq_masks)} masks in {seq_mask_dir}")
        for frame, mask in zip(frames, seq_masks):
            if frame.stem != mask.stem:
                raise BadInput(f"sequence {name!r}: frame {frame} has no mask "
                               f"{seq_mask_dir / (frame.stem + '.png')}")
        sequences.append(Sequence(name, frames, list(seq_masks)))
    return sequences


def _header(path, kind: str) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding it."""
    try:
        with Image.open(path) as image:
            if kind == "frame" and image.format != "JPEG":
                raise BadInput(f"frame {path} is not a JPEG ({image.format})")
            return image.size
    except FileNotFoundError as e:
        raise MissingInput(f"no such image file: {path}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"cannot read {kind} {path}: {e}") from e


def check_files(sequences) -> int:
    """Read the header of every frame and mask of ``sequences`` (cheap: nothing is decoded) and
    check that each sequence's images have one size. Raises BadInput / MissingInput naming the
    first bad file; returns the number of files checked."""
    count = 0
    for seq in sequences:
        size = None
        for kind, paths in (("frame", seq.frames), ("mask", seq.masks)):
            for path in paths:
                if path is None:
                    continue
                found = _header(path, kind)
                count += 1
                if size is None:
                    size, first = found, path
                elif found != size:
                    raise BadInput(f"{kind} {path} is {found[0]}x{found[1]}, but {first} is "
                                   f"{size[0]}x{size[1]} (sequence {seq.name!r})")
    return count
