"""Training losses (d2conv/losses.py): the Lovász hinge by hand and against the set-function
definition, padding invariance, BCE against torch, the combined kind, gradients and bf16."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from d2conv.losses import SegmentationLoss, bce, lovasz_hinge


def clip(values, dtype=torch.float32):
    """A (1, 1, 1, 1, n) tensor from a list: one clip of n voxels."""
    return torch.tensor(values, dtype=dtype).reshape(1, 1, 1, 1, -1)


def lovasz_by_definition(logits, target):
    """The Lovász extension of the Jaccard loss Δ(M) = |M| / |G ∪ M| (M = mispredicted set),
    evaluated at relu(errors) from its definition with Python sets: sum over the sorted errors of
    relu(e_(k)) * (Δ(top k) - Δ(top k-1))."""
    logits, target = logits.reshape(-1).tolist(), target.reshape(-1).tolist()
    errors = [1.0 - x * (2 * y - 1) for x, y in zip(logits, target)]
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    positives = {i for i, y in enumerate(target) if y == 1}

    def delta(m):
        return len(m) / len(positives | m) if m else 0.0

    total, prefix = 0.0, set()
    for i in order:
        before = delta(prefix)
        prefix = prefix | {i}
        total += max(errors[i], 0.0) * (delta(prefix) - before)
    return total


def test_lovasz_hand_computation():
    logits, target = clip([2.0, -1.0, 0.5, -3.0]), clip([1, 1, 0, 0])
    # signs = [1, 1, -1, -1]; errors = 1 - logits * signs = [-1, 2, 1.5, -2]
    # sorted decreasing: 2 (gt 1), 1.5 (gt 0), -1 (gt 1), -2 (gt 0); p = 2 positives
    # intersection = p - cumsum(gt) = [1, 1, 0, 0]; union = p + cumsum(1 - gt) = [2, 3, 3, 4]
    # J = 1 - I/U = [1/2, 2/3, 1, 1]; gradient = [1/2, 1/6, 1/3, 0]
    # loss = relu([2, 1.5, -1, -2]) . gradient = 2 * 1/2 + 1.5 * 1/6 = 1.25
    assert lovasz_hinge(logits, target).item() == pytest.approx(1.25, abs=1e-6)


def test_lovasz_matches_set_definition_and_batch_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 2, 3, 4, generator=g) * 2
    target = (torch.rand(3, 1, 2, 3, 4, generator=g) > 0.6).float()
    target[2] = 0                                          # a clip without foreground
    per_clip = [lovasz_by_definition(logits[b], target[b]) for b in range(3)]
    got = lovasz_hinge(logits, target)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(sum(per_clip) / 3, abs=1e-5)
    # per clip, not over the whole batch flattened
    assert lovasz_hinge(logits[:1], target[:1]).item() == pytest.approx(per_clip[0], abs=1e-5)


def test_lovasz_invariant_to_padding():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 3, 5, 6, generator=g)
    target = (torch.rand(2, 1, 3, 5, 6, generator=g) > 0.5).float()
    # pad H and W on the bottom/right with garbage logits and targets, marked invalid
    padded_logits = torch.randn(2, 1, 3, 8, 8, generator=g) * 10
    padded_target = (torch.rand(2, 1, 3, 8, 8, generator=g) > 0.5).float()
    padded_logits[..., :5, :6] = logits
    padded_target[..., :5, :6] = target
    valid = torch.zeros(2, 1, 3, 8, 8, dtype=torch.bool)
    valid[..., :5, :6] = True
    ref = lovasz_hinge(logits, target)
    assert lovasz_hinge(padded_logits, padded_target, valid).item() == pytest.approx(
        ref.item(), abs=1e-6)
    # changing what lies under the padding changes nothing
    other = padded_logits.clone()
    other[~valid] = -other[~valid] + 3
    flipped = torch.where(valid, padded_target, 1 - padded_target)
    assert lovasz_hinge(other, flipped, valid).item() == pytest.approx(ref.item(), abs=1e-6)
    # an invalid voxel scattered anywhere (not just a border) is excluded too
    scattered = torch.rand(2, 1, 3, 5, 6, generator=g) > 0.3
    kept = [lovasz_by_definition(logits[b][scattered[b]], target[b][scattered[b]])
            for b in range(2)]
    assert lovasz_hinge(logits, target, scattered).item() == pytest.approx(
        sum(kept) / 2, abs=1e-5)


def test_lovasz_zero_for_perfect_confident_prediction():
    target = (torch.rand(2, 1, 2, 4, 4) > 0.5).float()
    logits = (2 * target - 1) * 5.0                 # margin 5 > 1 on every voxel
    assert lovasz_hinge(logits, target).item() == 0.0
    assert SegmentationLoss("lovasz")(logits, target).item() == 0.0


def test_lovasz_empty_clip_contributes_zero_without_nan():
    logits = torch.randn(2, 1, 2, 3, 3, requires_grad=True)
    target = (torch.rand(2, 1, 2, 3, 3) > 0.5).float()
    valid = torch.ones(2, 1, 2, 3, 3, dtype=torch.bool)
    valid[1] = False
    loss = lovasz_hinge(logits, target, valid)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(lovasz_hinge(logits[:1], target[:1]).item() / 2, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()
    none = torch.zeros_like(valid)
    for fn in (lovasz_hinge, bce):
        value = fn(logits, target, none)
        assert value.item() == 0.0 and value.requires_grad


def test_bce_matches_torch_on_valid_subset():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 3, 4, 5, generator=g) * 3
    target = (torch.rand(2, 1, 3, 4, 5, generator=g) > 0.5).float()
    valid = torch.rand(2, 1, 3, 4, 5, generator=g) > 0.4
    ref = F.binary_cross_entropy_with_logits(logits[valid], target[valid])
    assert bce(logits, target, valid).item() == pytest.approx(ref.item(), rel=1e-6)
    assert bce(logits, target).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-6)


def test_combined_kind_is_the_sum_and_bad_kind_is_named():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 2, 4, 4, generator=g)
    target = (torch.rand(2, 1, 2, 4, 4, generator=g) > 0.5).float()
    valid = torch.rand(2, 1, 2, 4, 4, generator=g) > 0.2
    both = SegmentationLoss("bce+lovasz")(logits, target, valid)
    parts = (SegmentationLoss("bce")(logits, target, valid)
             + SegmentationLoss("lovasz")(logits, target, valid))
    assert both.item() == pytest.approx(parts.item(), rel=1e-6)
    assert SegmentationLoss()(logits, target, valid).item() == pytest.approx(
        lovasz_hinge(logits, target, valid).item())
    with pytest.raises(ValueError, match="dice"):
        SegmentationLoss("dice")


@pytest.mark.parametrize("kind", ["lovasz", "bce", "bce+lovasz"])
def test_gradient_finite(kind):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 1, 2, 6, 6, generator=g) * 4).requires_grad_()
    target = (torch.rand(2, 1, 2, 6, 6, generator=g) > 0.5).float()
    valid = torch.ones_like(target, dtype=torch.bool)
    valid[..., 4:, :] = False
    loss = SegmentationLoss(kind)(logits, target, valid)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    assert (logits.grad[~valid] == 0).all()


@pytest.mark.parametrize("kind", ["lovasz", "bce", "bce+lovasz"])
def test_bf16_logits_accepted(kind):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 1, 2, 4, 4, generator=g).bfloat16().requires_grad_()
    target = (torch.rand(2, 1, 2, 4, 4, generator=g) > 0.5)       # bool target works too
    loss = SegmentationLoss(kind)(logits, target)
    assert loss.dtype == torch.float32
    ref = SegmentationLoss(kind)(logits.detach().float(), target.float())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_lovasz_value_independent_of_ties():
    # tied errors: any order of the sort gives the same value (the Lovász extension is continuous)
    logits, target = clip([0.0, 0.0, 0.0, 1.0]), clip([1, 0, 1, 0])
    values = set()
    for perm in itertools.permutations(range(4)):
        p = list(perm)
        values.add(round(lovasz_hinge(logits[..., p], target[..., p]).item(), 6))
    assert len(values) == 1
    assert values.pop() == pytest.approx(lovasz_by_definition(logits, target), abs=1e-6)
