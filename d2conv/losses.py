"""Segmentation losses for training (docs/training.md): the Lovász hinge over all voxels of each
clip, mean over the batch (the paper's loss), binary cross-entropy, and their sum as an option.

Shapes: ``logits`` and ``target`` are (B, 1, T, H, W) (any shape with the batch first works);
``target`` holds 0/1; ``valid`` is a bool tensor of the same shape (or broadcastable to it) marking
the voxels that count, e.g. False on the padding, or None for all of them. Every loss is computed in
fp32 whatever the dtype of ``logits`` (bf16/fp16 under autocast are cast up) and returns a 0-d fp32
tensor that stays connected to ``logits`` even when no voxel is valid (then its value is 0).
"""
import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("lovasz", "bce", "bce+lovasz")


def _prepare(logits, target, valid):
    """fp32 logits and target, and the valid mask expanded to their shape (None stays None)."""
    logits = logits.float()
    target = target.to(device=logits.device, dtype=torch.float32)
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} != logits shape "
                         f"{tuple(logits.shape)}")
    if valid is not None:
        valid = valid.to(device=logits.device, dtype=torch.bool).expand_as(logits)
    return logits, target, valid


def _zero(logits):
    """A 0 that still belongs to the autograd graph of ``logits`` (a zero gradient flows back)."""
    return logits.sum() * 0.0


def lovasz_grad(gt_sorted):
    """Gradient of the Lovász extension of the Jaccard loss at a point whose coordinates, sorted in
    decreasing order, belong to the labels ``gt_sorted`` (1-D float, 0/1, length n >= 1).

    With p = number of positives, after the first k sorted elements:
    intersection_k = p - cumsum(gt)_k, union_k = p + cumsum(1 - gt)_k,
    J_k = 1 - intersection_k / union_k, and the gradient is (J_1, J_2 - J_1, ..., J_n - J_{n-1}).
    union_k >= 1 for every k (either p >= 1 or the first element is a negative), so no division by 0.
    """
    positives = gt_sorted.sum()
    intersection = positives - gt_sorted.cumsum(0)
    union = positives + (1.0 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_hinge_flat(logits, target):
    """Lovász hinge of one set of voxels: ``logits`` and ``target`` are 1-D (n,), fp32, n >= 1.

    signs = 2 target - 1, errors = 1 - logits * signs, sorted in decreasing order; the loss is
    relu(errors_sorted) · lovasz_grad(target_sorted). The gradient flows through the errors only
    (the sort permutation and the Jaccard gradient are constants, as in Berman et al. 2018).
    """
    signs = 2.0 * target - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, order = torch.sort(errors, descending=True)
    grad = lovasz_grad(target[order])
    return torch.dot(F.relu(errors_sorted), grad)


def lovasz_hinge(logits, target, valid=None):
    """Lovász hinge loss, per clip over all valid voxels of the clip flattened, mean over the batch.

    Args:
        logits: (B, 1, T, H, W) raw scores, any float dtype (computed in fp32).
        target: (B, 1, T, H, W) ground truth in {0, 1} (bool, integer or float).
        valid: (B, 1, T, H, W) bool (or broadcastable), True where a voxel counts; None = all.
    Returns:
        0-d fp32 tensor: the mean over the B clips of each clip's Lovász hinge; a clip without any
        valid voxel contributes 0 (it still counts in the mean over B), never NaN.
    """
    logits, target, valid = _prepare(logits, target, valid)
    if logits.dim() == 0 or logits.shape[0] == 0:
        return _zero(logits)
    losses = []
    for b in range(logits.shape[0]):
        x, y = logits[b].reshape(-1), target[b].reshape(-1)
        if valid is not None:
            keep = valid[b].reshape(-1)
            x, y = x[keep], y[keep]
        losses.append(lovasz_hinge_flat(x, y) if x.numel() else _zero(logits[b]))
    return torch.stack(losses).mean()


def bce(logits, target, valid=None):
    """Binary cross-entropy with logits, averaged over the valid voxels of the whole batch.

    Args:
        logits: (B, 1, T, H, W) raw scores, any float dtype (computed in fp32).
        target: (B, 1, T, H, W) ground truth in {0, 1} (or soft targets in [0, 1]).
        valid: (B, 1, T, H, W) bool (or broadcastable), True where a voxel counts; None = all.
    Returns:
        0-d fp32 tensor: sum of the per-voxel BCE over valid voxels / number of valid voxels, 0 if
        there is none.
    """
    logits, target, valid = _prepare(logits, target, valid)
    per_voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if valid is None:
        return per_voxel.mean() if per_voxel.numel() else _zero(logits)
    total = torch.where(valid, per_voxel, torch.zeros_like(per_voxel)).sum()
    return total / valid.sum().clamp(min=1)        # no host sync; 0 / 1 = 0 when none is valid


class SegmentationLoss(nn.Module):
    """The training loss: ``kind`` is "lovasz" (the paper's), "bce", or "bce+lovasz" (their sum).

    ``forward(logits, target, valid=None)`` takes (B, 1, T, H, W) tensors as ``lovasz_hinge`` and
    ``bce`` do and returns a 0-d fp32 tensor.
    """

    def __init__(self, kind="lovasz"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.kind = kind

    def forward(self, logits, target, valid=None):
        if self.kind == "lovasz":
            return lovasz_hinge(logits, target, valid)
        if self.kind == "bce":
            return bce(logits, target, valid)
        return bce(logits, target, valid) + lovasz_hinge(logits, target, valid)

    def extra_repr(self):
        return f"kind={self.kind!r}"
