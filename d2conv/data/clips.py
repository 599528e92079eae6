"""Training clips: T frames around each frame of each video, optionally augmented, padded to
multiples of 32.

A sample (one per (video, centre frame i)) is a dict:

    clip    float32 (3, T, H', W')  RGB in [0, 1], zero-padded evenly on both sides
                                    (``d2conv.model.pad_to_multiple``: 854 -> 864 is 5 px a side)
    target  float32 (1, T, H', W')  salient mask in {0, 1}
    valid   bool    (1, T, H', W')  False on the padding and on frames without annotation
    name    str                     the video
    frames  int64   (T,)            the frame indices, sorted
    size    int64   (2,)            [H, W] before padding

Randomness comes from a ``numpy.random.Generator`` seeded by (seed, epoch, index): a sample is
reproducible, and redrawn when :meth:`ClipDataset.set_epoch` changes the epoch (the epoch lives in
shared memory, so persistent DataLoader workers see it too).
"""
import bisect

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset

from ..model import pad_to_multiple
from .davis import Sequence, load_mask, read_frames

__all__ = ["ClipDataset", "WeightedMix", "sample_frames"]


def sample_frames(n: int, i: int, clip_len: int, half_window: int, rng,
                  replace: bool = True) -> np.ndarray:
    """``clip_len`` sorted frame indices drawn uniformly from the window
    [i - half_window, i + half_window) ∩ [0, n).

    replace=True is the original's ``random.choices``: at 8 from an 8-frame window a clip holds
    about 5.3 distinct frames, and a new draw differs. replace=False draws without replacement
    (with, where the window holds fewer than clip_len frames): from an 8-frame window that is
    always the same 8 consecutive frames."""
    lo, hi = max(0, i - half_window), min(n, i + half_window)
    hi = max(hi, lo + 1)                                   # half_window 0: the centre frame
    window = np.arange(lo, hi)
    return np.sort(rng.choice(window, clip_len, replace=replace or len(window) < clip_len))


def resize(x, size, mode):
    """x (T, C, H, W) float -> (T, C, *size): "bilinear" with antialiasing (images) or
    "nearest" (masks); unchanged when it has that size. Inference resizes frames through here
    too, so a model sees frames resized as in training."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(x, size=size, mode="nearest-exact")


def _fit(x, size, offset):
    """Crop or zero-pad x (..., h, w) to ``size`` with the content starting at ``offset`` (may be
    negative: a crop)."""
    (h, w), (H, W), (oy, ox) = x.shape[-2:], size, offset
    out = x.new_zeros(*x.shape[:-2], H, W)
    ys, xs = slice(max(oy, 0), min(oy + h, H)), slice(max(ox, 0), min(ox + w, W))
    out[..., ys, xs] = x[..., ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox]
    return out


class _EpochMixin:
    """``epoch`` in a shared-memory tensor so that DataLoader workers follow ``set_epoch``."""

    def _init_epoch(self):
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int):
        self._epoch.fill_(int(epoch))


class ClipDataset(_EpochMixin, Dataset):
    """One sample per frame of every sequence (see the module docstring for the sample).

    size: (H, W) to resize to (bilinear images, nearest masks), or None to keep the frames' size.
    replace: frames drawn with replacement (the paper's recipe) or without (``sample_frames``).
    augment: horizontal flip (``flip``, p = 0.5), scale jitter by a factor drawn from
    ``scale_jitter`` then a random crop (or zero padding, not valid) back to the size, colour
    jitter (``color_jitter``): the same for every frame of a clip.
    """

    def __init__(self, sequences: list[Sequence], clip_len=8, size=None, augment=False, flip=True,
                 scale_jitter=(0.8, 1.2), color_jitter=False, half_window=4, replace=True, seed=0,
                 multiple=32):
        self.sequences = list(sequences)
        self.clip_len, self.half_window, self.multiple = clip_len, half_window, multiple
        self.replace = replace
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.augment, self.flip, self.color_jitter = augment, flip, color_jitter
        self.scale_jitter, self.seed = scale_jitter, seed
        self._starts = np.cumsum([0] + [len(s.frames) for s in self.sequences]).tolist()
        self._init_epoch()

    def __len__(self):
        return self._starts[-1]

    def locate(self, index: int) -> tuple[Sequence, int]:
        """(sequence, centre frame) of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        s = bisect.bisect_right(self._starts, index) - 1
        return self.sequences[s], index - self._starts[s]

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index):
        seq, i = self.locate(index)
        rng = self.rng(index)
        ids = sample_frames(len(seq.frames), i, self.clip_len, self.half_window, rng,
                            self.replace)
        images, masks, annotated = self._load(seq, ids)     # (T, 3, H, W), (T, 1, H, W), (T,)
        if self.size is not None:
            images = resize(images, self.size, "bilinear")
            masks = resize(masks, self.size, "nearest")
        area = torch.ones_like(masks)                       # 0 where augmentation padded
        if self.augment:
            images, masks, area = self._augment(images, masks, area, rng)
        h, w = images.shape[-2:]
        images, masks, area = (pad_to_multiple(x, self.multiple)[0] for x in (images, masks, area))
        valid = (area > 0.5) & annotated.view(-1, 1, 1, 1)
        clip, target, valid = (rearrange(x, "t c h w -> c t h w").contiguous()
                               for x in (images, masks, valid))
        return {"clip": clip, "target": target, "valid": valid,
                "name": seq.name, "frames": torch.from_numpy(ids).long(),
                "size": torch.tensor([h, w], dtype=torch.long)}

    def _load(self, seq: Sequence, ids):
        """Frames ``ids`` of ``seq``: images float (T, 3, H, W) in [0, 1], masks float
        (T, 1, H, W) (zero where not annotated), annotated bool (T,)."""
        images = read_frames(seq, ids).float().div_(255)
        shape = tuple(images.shape[-2:])
        masks, annotated = [], []
        for k in ids:
            path = seq.masks[k]
            mask = np.zeros(shape, bool) if path is None else load_mask(path)
            if mask.shape != shape:
                raise ValueError(f"mask {path} is {mask.shape}, its frame {seq.frames[k]} {shape}")
            masks.append(mask)
            annotated.append(path is not None)
        masks = torch.from_numpy(np.stack(masks)).unsqueeze(1).float()
        return images, masks, torch.tensor(annotated)

    def _augment(self, images, masks, area, rng):
        """Flip, scale jitter + crop/pad back to the size, colour jitter: one draw per clip."""
        if self.flip and rng.random() < 0.5:
            images, masks, area = images.flip(-1), masks.flip(-1), area.flip(-1)
        if self.scale_jitter is not None:
            size = tuple(images.shape[-2:])
            s = rng.uniform(*self.scale_jitter)
            scaled = tuple(max(1, round(n * s)) for n in size)
            images = resize(images, scaled, "bilinear")
            masks, area = resize(masks, scaled, "nearest"), resize(area, scaled, "nearest")
            # content offset: in [size - scaled, 0] when cropping, [0, size - scaled] when padding
            offset = tuple(int(rng.integers(min(0, n - m), max(0, n - m) + 1))
                           for n, m in zip(size, scaled))
            images, masks, area = (_fit(x, size, offset) for x in (images, masks, area))
        if self.color_jitter:
            b, c, sat = rng.uniform(0.8, 1.2, 3)
            gray = images.mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
            images = gray + (images - gray) * sat                   # saturation
            images = (images - gray.mean()) * c + gray.mean()       # contrast
            images = (images * b).clamp_(0, 1) * area               # brightness; padding stays 0
        return images, masks, area


class WeightedMix(_EpochMixin, Dataset):
    """``length`` samples; sample k is ``datasets[d][j]`` with d drawn with probability
    ``weights[d]`` and j uniform, from a Generator seeded by (seed, epoch, k)."""

    def __init__(self, datasets, weights, length: int, seed=0):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        weights = np.asarray(weights, dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights.tolist()}")
        if any(len(d) == 0 for d, w in zip(datasets, weights) if w > 0):
            raise ValueError("a dataset with a positive weight is empty")
        self.datasets, self.weights = list(datasets), weights / weights.sum()
        self.length, self.seed = int(length), seed
        self._init_epoch()

    def __len__(self):
        return self.length

    def choose(self, k: int) -> tuple[int, int]:
        """(dataset, index) that sample k reads this epoch."""
        if not 0 <= k < self.length:
            raise IndexError(f"sample {k} out of range [0, {self.length})")
        rng = np.random.default_rng([self.seed, self.epoch, k])
        d = int(rng.choice(len(self.datasets), p=self.weights))
        return d, int(rng.integers(len(self.datasets[d])))

    def __getitem__(self, k):
        d, j = self.choose(k)
        return self.datasets[d][j]

    def set_epoch(self, epoch: int):
        super().set_epoch(epoch)
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)
