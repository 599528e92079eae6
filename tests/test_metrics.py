"""Evaluation metrics (d2conv/metrics.py) on hand-made cases: J, the DAVIS boundary rule, F with a
known geometry, the per-sequence statistics (Decay past 256 frames), the CSV files, and the
saliency metrics."""
import csv
import math
import os
import time

import numpy as np
import pytest

from d2conv import metrics
from d2conv.metrics import (GLOBAL_COLUMNS, davis_scores, decay_indices,
                            dilate_disk, f_measure, foreground_iou, j_measure, mae,
                            max_f_measure, seg2bmap, statistics, write_csvs)


def square(h, w, top, left, size):
    m = np.zeros((h, w), bool)
    m[top:top + size, left:left + size] = True
    return m


def dilate_by_offsets(mask, r):
    """Reference dilation: OR of the mask shifted by every offset of the disk i² + j² <= r²."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx > r * r:
                continue
            for y, x in zip(*np.nonzero(mask)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    out[y + dy, x + dx] = True
    return out


# ------------------------------------------------------------------------------------- J

def test_j_hand_cases():
    empty, full = np.zeros((6, 7), bool), np.ones((6, 7), bool)
    assert j_measure(empty, empty) == 1.0
    assert j_measure(empty, full) == 0.0
    assert j_measure(full, full) == 1.0
    one = np.zeros((6, 7), bool)
    one[2, 3] = True
    assert j_measure(one, one) == 1.0
    assert j_measure(one, empty) == 0.0
    assert j_measure(one, full) == pytest.approx(1 / 42)
    a, b = square(10, 10, 0, 0, 4), square(10, 10, 2, 2, 4)     # 16 each, overlap 4
    assert j_measure(a, b) == pytest.approx(4 / 28)
    # 0/255 masks are binarised with != 0
    assert j_measure(a.astype(np.uint8) * 255, b.astype(np.uint8)) == pytest.approx(4 / 28)


def test_j_stack_and_foreground_iou():
    empty = np.zeros((5, 5), bool)
    a, b = square(5, 5, 0, 0, 2), square(5, 5, 1, 1, 2)
    pred, gt = np.stack([empty, a, a]), np.stack([empty, a, b])
    j = j_measure(pred, gt)
    assert j.shape == (3,) and j.dtype == np.float64
    np.testing.assert_allclose(j, [1.0, 1.0, 1 / 7])
    assert foreground_iou(pred, gt) == pytest.approx((2 + 1 / 7) / 3)
    assert foreground_iou(empty, empty) == 1.0         # not 0 as in the original training code


# ------------------------------------------------------------------------------ seg2bmap

def test_seg2bmap_hand_drawn():
    s = np.array([[0, 0, 0, 0, 0],
                  [0, 1, 1, 0, 0],
                  [0, 1, 1, 0, 0],
                  [0, 0, 0, 0, 0]], bool)
    expected = np.array([[1, 1, 1, 0, 0],
                         [1, 0, 1, 0, 0],
                         [1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(seg2bmap(s), expected)


def test_seg2bmap_border_is_no_boundary():
    left = np.zeros((4, 5), bool)
    left[:, :2] = True                    # touches the top, left and bottom borders
    expected = np.zeros((4, 5), bool)
    expected[:, 1] = True                 # only the vertical edge inside the image
    np.testing.assert_array_equal(seg2bmap(left), expected)

    corner = np.zeros((4, 5), bool)
    corner[2:, 3:] = True                 # bottom-right corner block
    expected = np.array([[0, 0, 0, 0, 0],
                         [0, 0, 1, 1, 1],   # (1,2) by SE; (1,3) by S; (1,4) last column: s^S
                         [0, 0, 1, 0, 0],   # (2,2) by E; (2,4) last column: 1^1 = 0
                         [0, 0, 1, 0, 0]],  # (3,2) last row: s^E; (3,3) 1^1 = 0; (3,4) = 0
                        bool)
    np.testing.assert_array_equal(seg2bmap(corner), expected)

    assert not seg2bmap(np.ones((6, 7), bool)).any()      # full frame: no boundary at all
    single = np.zeros((5, 5), bool)
    single[2, 2] = True                                   # a 2×2 ring up-left of the pixel
    assert set(zip(*np.nonzero(seg2bmap(single)))) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    # the stack version is the frame version on each frame
    stack = np.stack([left, corner, single[:4]])
    np.testing.assert_array_equal(seg2bmap(stack)[1], seg2bmap(corner))


# ------------------------------------------------------------------------------------- F

def test_radius():
    assert metrics.boundary_radius((480, 854)) == 8
    assert metrics.boundary_radius((100, 100)) == 2          # ceil(0.008 * 141.42) = 2
    assert metrics.boundary_radius((100, 100), bound_th=3) == 3


def test_dilate_disk_matches_offsets():
    rng = np.random.default_rng(0)
    mask = rng.random((23, 31)) > 0.97
    mask[0, 0] = mask[-1, -1] = mask[0, -1] = True
    for r in (1, 2, 3, 5, 8):
        np.testing.assert_array_equal(dilate_disk(mask, r), dilate_by_offsets(mask, r))
    # radius larger than the image
    np.testing.assert_array_equal(dilate_disk(mask[:4, :3], 8), dilate_by_offsets(mask[:4, :3], 8))


def test_f_hand_cases():
    empty, full = np.zeros((20, 20), bool), np.ones((20, 20), bool)
    sq = square(20, 20, 5, 5, 6)
    assert f_measure(empty, empty) == 1.0
    assert f_measure(full, full) == 1.0          # no boundary on either: the empty-empty rule
    # a full-frame mask has no boundary under the DAVIS rule, so empty vs full scores F = 1
    # (J = 0): a quirk of the official measure, kept
    assert f_measure(empty, full) == 1.0 and j_measure(empty, full) == 0.0
    assert f_measure(empty, sq) == 0.0 and f_measure(sq, empty) == 0.0   # exactly one empty
    assert f_measure(full, sq) == 0.0
    assert f_measure(sq, sq) == 1.0
    one = np.zeros((20, 20), bool)
    one[5, 5] = True
    assert f_measure(one, one) == 1.0
    assert f_measure(one, empty) == 0.0
    beside = np.roll(one, 1, axis=1)             # one pixel to the right, radius 1 at 20×20
    assert j_measure(one, beside) == 0.0 and f_measure(one, beside) == 1.0


def test_f_square_shift_inside_and_beyond_tolerance():
    # 100×100: radius ceil(0.008·√20000) = 2. The DAVIS boundary of a square at rows/cols
    # 30..59 is the perimeter of the rectangle rows 29..59, cols 29..59 (120 pixels).
    gt = square(100, 100, 30, 30, 30)
    bg = seg2bmap(gt)
    assert np.count_nonzero(bg) == 120
    assert bg[29, 29:60].all() and bg[59, 29:60].all() and bg[29:60, 29].all()
    assert bg[29:60, 59].all()
    assert f_measure(np.roll(gt, 2, axis=1), gt) == 1.0      # shift 2 <= r: everything matches
    assert f_measure(np.roll(gt, 2, axis=0), gt) == 1.0
    # Shift by 3 to the right: predicted perimeter rows 29..59, cols 32..62. Matched within 2 px
    # of the GT perimeter: top and bottom rows x = 32..61 (2 × 30), left column y = 30, 31, 57,
    # 58 (near the GT top/bottom rows, 4), right column none: 64 of 120. By symmetry recall is
    # 64/120 as well, so F = 64/120 = 8/15.
    pred = np.roll(gt, 3, axis=1)
    assert f_measure(pred, gt) == pytest.approx(8 / 15, abs=1e-12)
    assert f_measure(gt, pred) == pytest.approx(8 / 15, abs=1e-12)
    # a larger explicit radius covers the shift again
    assert f_measure(pred, gt, bound_th=3) == 1.0


def test_f_stack_matches_frames():
    gt = square(100, 100, 30, 30, 30)
    preds = np.stack([gt, np.roll(gt, 3, axis=1), np.zeros_like(gt)])
    gts = np.stack([gt, gt, gt])
    f = f_measure(preds, gts)
    assert f.shape == (3,)
    np.testing.assert_allclose(f, [1.0, 8 / 15, 0.0])
    seq = metrics.sequence_measures(preds, gts)
    np.testing.assert_allclose(seq["F"], f)
    np.testing.assert_allclose(seq["J"], j_measure(preds, gts))


def test_f_full_resolution_is_fast():
    rng = np.random.default_rng(1)
    gt = np.zeros((480, 854), bool)
    gt[100:380, 200:650] = True
    pred = gt.copy()
    pred[rng.random(gt.shape) > 0.995] ^= True           # noisy boundary everywhere
    start = time.perf_counter()
    f = f_measure(pred, gt)
    assert time.perf_counter() - start < 1.0
    assert 0.0 < f < 1.0


# ---------------------------------------------------------------------------- statistics

def test_statistics_mean_and_recall():
    s = statistics([0.2, 0.5, 0.6, 0.9])
    assert s.mean == pytest.approx(0.55)
    assert s.recall == 0.5                       # strictly greater than 0.5
    assert isinstance(s, tuple) and len(s) == 3


def test_decay_more_than_256_frames():
    n = 300
    v = np.arange(n) / (n - 1)                   # a linear ramp from 0 to 1
    # linspace(1, 300, 5) = 1, 75.75, 150.5, 225.25, 300 -> round (ties up) 1, 76, 151, 225, 300
    # -> ids 0, 75, 150, 224, 299 in int64 (uint8 would make 299 -> 43 and bin 3 empty)
    np.testing.assert_array_equal(decay_indices(n), [0, 75, 150, 224, 299])
    bin0 = np.arange(0, 76) / 299                 # v[0 : 75 + 1]
    bin3 = np.arange(224, 300) / 299              # v[224 : 299 + 1]
    assert bin0.mean() == pytest.approx(37.5 / 299)
    assert bin3.mean() == pytest.approx(261.5 / 299)
    s = statistics(v)
    assert s.decay == pytest.approx(-224 / 299, abs=1e-12)
    assert s.mean == pytest.approx(0.5)
    assert s.recall == pytest.approx(150 / 300)      # v > 0.5 for indices 150..299


def test_decay_short_sequences():
    assert statistics([0.7]).decay == 0.0
    assert statistics([0.9, 0.4]).decay == pytest.approx(0.5)
    # N = 3: linspace(1, 3, 5) = 1, 1.5, 2, 2.5, 3 -> ties round up -> ids 0, 1, 1, 2, 2
    np.testing.assert_array_equal(decay_indices(3), [0, 1, 1, 2, 2])
    assert statistics([1.0, 0.5, 0.0]).decay == pytest.approx(0.75 - 0.0)
    # shared endpoints: N = 5 gives ids 0..4 and bins [v0, v1], ..., [v3, v4]
    assert statistics([1.0, 0.8, 0.5, 0.3, 0.1]).decay == pytest.approx(0.9 - 0.2)
    assert all(math.isnan(x) for x in statistics([]))


# ---------------------------------------------------------------------- global and CSVs

def test_davis_scores_and_csv_round_trip(tmp_path):
    per_sequence = {
        "blackswan": {"J": np.array([0.9, 0.8, 0.7, 0.6, 0.5]), "F": np.array([1.0] * 5)},
        "car-roundabout": {"J": [0.4, 0.6], "F": [0.2, 0.3]},
    }
    global_row, rows = davis_scores(per_sequence)
    assert list(global_row) == list(GLOBAL_COLUMNS)
    j_means, f_means = (0.7, 0.5), (1.0, 0.25)
    assert global_row["J-Mean"] == pytest.approx(np.mean(j_means))
    assert global_row["F-Mean"] == pytest.approx(np.mean(f_means))
    assert global_row["J&F-Mean"] == pytest.approx((np.mean(j_means) + np.mean(f_means)) / 2)
    assert global_row["J-Recall"] == pytest.approx((0.8 + 0.5) / 2)
    assert global_row["J-Decay"] == pytest.approx(((0.85 - 0.55) + (0.4 - 0.6)) / 2)
    assert global_row["F-Recall"] == pytest.approx((1.0 + 0.0) / 2)
    assert global_row["F-Decay"] == pytest.approx((0.0 + (0.2 - 0.3)) / 2)
    assert [r["Sequence"] for r in rows] == ["blackswan", "car-roundabout"]
    assert rows[1] == {"Sequence": "car-roundabout", "J-Mean": pytest.approx(0.5),
                       "F-Mean": pytest.approx(0.25)}
    assert all(type(v) is float for v in global_row.values())

    g_path, s_path = write_csvs(tmp_path / "out", "val", global_row, rows)
    assert os.path.basename(g_path) == "global_results-val.csv"
    assert os.path.basename(s_path) == "per-sequence_results-val.csv"
    with open(g_path) as f:
        lines = f.read().split("\n")
    assert lines[0] == "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay"
    assert lines[1] == ",".join("%.3f" % global_row[k] for k in GLOBAL_COLUMNS)
    assert lines[2:] == [""]
    with open(s_path) as f:
        assert f.readline() == "Sequence,J-Mean,F-Mean\n"
    with open(s_path, newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["Sequence"] for r in back] == ["blackswan", "car-roundabout"]
    for got, want in zip(back, rows):
        assert float(got["J-Mean"]) == pytest.approx(want["J-Mean"], abs=5e-4)
        assert float(got["F-Mean"]) == pytest.approx(want["F-Mean"], abs=5e-4)
    assert back[0]["J-Mean"] == "0.700"
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["global_results-val.csv", "per-sequence_results-val.csv"])   # no temp file left over
    # rewriting replaces the files
    write_csvs(tmp_path / "out", "val", global_row, rows[:1])
    with open(s_path) as f:
        assert len(f.read().strip().split("\n")) == 2


# -------------------------------------------------------------------------------- saliency

def test_mae_and_max_f_measure_tiny():
    prob = np.array([[0.8, 0.6], [0.4, 0.2]])
    gt = np.array([[1, 0], [1, 0]])
    assert mae(prob, gt) == pytest.approx((0.2 + 0.6 + 0.6 + 0.2) / 4)
    # thresholds k/255: t in (0.6, 0.8] -> P = 1, R = 1/2, F = 1.3·0.5 / (0.3 + 0.5) = 0.8125
    # (0.4, 0.6] -> P = R = 1/2, F = 0.5; (0.2, 0.4] -> P = 2/3, R = 1, F = 0.7222;
    # t <= 0.2 -> P = 1/2, R = 1, F = 0.5652; t > 0.8 -> nothing predicted, F = 0
    assert max_f_measure(prob, gt) == pytest.approx(0.8125)
    assert max_f_measure(prob, gt * 255) == pytest.approx(0.8125)      # 0/255 ground truth
    perfect = np.array([[0.9, 0.1], [0.7, 0.3]])
    assert max_f_measure(perfect, gt) == pytest.approx(1.0)
    assert mae(gt.astype(float), gt) == 0.0


def test_max_f_measure_averaging_over_frames():
    prob = np.stack([np.array([[0.8, 0.6], [0.4, 0.2]]), np.array([[1.0, 0.0], [0.0, 0.0]])])
    gt = np.stack([np.array([[1, 0], [1, 0]]), np.array([[1, 1], [0, 0]])])
    # at t = 0.5: frame A P = 1/2, R = 1/2; frame B P = 1, R = 1/2
    p, r = 0.75, 0.5
    assert max_f_measure(prob, gt, thresholds=[0.5]) == pytest.approx(
        1.3 * p * r / (0.3 * p + r))
    assert max_f_measure(prob, gt, thresholds=[0.5], average="f") == pytest.approx(
        (0.5 + 1.3 * 0.5 / 0.8) / 2)
    # a list of frames of different sizes works and weights frames equally in the MAE
    frames = [np.array([[0.5]]), np.zeros((2, 2))]
    masks = [np.array([[1]]), np.zeros((2, 2))]
    assert mae(frames, masks) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mae(np.array([[2.0]]), np.array([[1]]))
    with pytest.raises(ValueError):
        max_f_measure(prob, gt, average="mean")
