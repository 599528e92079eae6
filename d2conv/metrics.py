"""Evaluation metrics in numpy (docs/davis.md): the DAVIS region (J) and boundary (F) measures
with the per-sequence statistics (Mean, Recall, Decay) and the CSV files of the official DAVIS
evaluation, the foreground IoU (J over every frame, as validation reports it), and MAE / max
F-measure for saliency-style evaluation (FBMS, ViSal).

Masks are numpy arrays (anything ``np.asarray`` takes, CPU torch tensors included) of shape (H, W)
for one frame or (..., H, W) for a stack; they are binarised with ``!= 0`` (so bool, 0/1 and the
0/255 PNGs of DAVIS-2016 all work, which is the "> 0" rule of the official tool for unsigned data).
"""
import csv
import math
import os
import tempfile
import warnings
from collections import namedtuple

import numpy as np

GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")
DECAY_BINS = 4

Statistics = namedtuple("Statistics", ["mean", "recall", "decay"])


def _binary(mask):
    mask = np.asarray(mask)
    return mask if mask.dtype == np.bool_ else mask != 0


def _pair(pred, gt):
    pred, gt = _binary(pred), _binary(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    if pred.ndim < 2:
        raise ValueError(f"masks must be (H, W) or (..., H, W), got shape {pred.shape}")
    return pred, gt


# --------------------------------------------------------------------------------------------
# J: region similarity
# --------------------------------------------------------------------------------------------

def j_measure(pred, gt):
    """Region similarity (Jaccard index) |P ∧ G| / |P ∨ G|, 1.0 when both masks are empty.

    Args:
        pred, gt: (H, W) masks, or stacks (..., H, W) of the same shape.
    Returns:
        a float for (H, W) inputs, else a float64 array of the leading shape (e.g. (N,)).
    """
    pred, gt = _pair(pred, gt)
    inter = np.count_nonzero(pred & gt, axis=(-2, -1))
    union = np.count_nonzero(pred | gt, axis=(-2, -1))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(j) if pred.ndim == 2 else j.astype(np.float64)


def foreground_iou(pred, gt):
    """Mean over frames of the per-frame J (an empty prediction on an empty frame scores 1, not 0
    as in the original training code). ``pred``/``gt``: (H, W) or (..., H, W). Returns a float."""
    return float(np.mean(j_measure(pred, gt)))


# --------------------------------------------------------------------------------------------
# F: boundary accuracy
# --------------------------------------------------------------------------------------------

def seg2bmap(seg):
    """Boundary map of a binary mask by the DAVIS rule.

    With s the mask and E, S, SE its zero-filled shifts (the pixel to the right, below, and below
    right), b = (s ⊕ E) | (s ⊕ S) | (s ⊕ SE); on the last row b = s ⊕ E, on the last column
    b = s ⊕ S, and b[-1, -1] = 0: a mask touching the image border has no boundary along it (a
    full-frame mask has no boundary at all).

    Args:
        seg: (H, W) mask or (..., H, W) stack.
    Returns:
        bool array of the same shape.
    """
    s = _binary(seg)
    if s.ndim < 2:
        raise ValueError(f"seg must be (H, W) or (..., H, W), got shape {s.shape}")
    east = np.zeros_like(s)
    south = np.zeros_like(s)
    south_east = np.zeros_like(s)
    east[..., :, :-1] = s[..., :, 1:]
    south[..., :-1, :] = s[..., 1:, :]
    south_east[..., :-1, :-1] = s[..., 1:, 1:]
    b = (s ^ east) | (s ^ south) | (s ^ south_east)
    b[..., -1, :] = s[..., -1, :] ^ east[..., -1, :]
    b[..., :, -1] = s[..., :, -1] ^ south[..., :, -1]
    b[..., -1, -1] = False
    return b


def boundary_radius(shape, bound_th=0.008):
    """Tolerance radius in pixels: ceil(bound_th * sqrt(H² + W²)) when bound_th < 1 (8 at 480×854),
    else bound_th itself (a radius in pixels)."""
    if bound_th >= 1:
        return bound_th
    h, w = shape[-2:]
    return math.ceil(bound_th * math.sqrt(h * h + w * w))


def _half_width(radius, dy):
    """The largest w >= 0 with w² + dy² <= radius² (radius may be fractional), for |dy| <= radius."""
    r2 = radius * radius
    w = int(math.floor(math.sqrt(max(r2 - dy * dy, 0.0))))
    while (w + 1) ** 2 + dy * dy <= r2:
        w += 1
    while w > 0 and w * w + dy * dy > r2:
        w -= 1
    return w


def dilate_disk(mask, radius):
    """Binary dilation of ``mask`` ((H, W) or (..., H, W)) by the disk {(i, j): i² + j² <= r²},
    outside of the image counting as background (what cv2.dilate does with skimage's disk).

    The disk is a union of horizontal segments, so the dilation is computed as horizontal dilations
    by half-widths 0..r (built incrementally), each shifted vertically: about 4r array operations
    instead of one per disk offset.
    """
    mask = _binary(mask)
    r_int = int(math.floor(radius))
    if r_int <= 0:
        return mask.copy()
    h, w = mask.shape[-2:]
    rows = [mask]                      # rows[k] = dilation of mask by the segment [-k, k]
    for k in range(1, min(r_int, w - 1) + 1):
        cur = rows[-1].copy()
        cur[..., :, k:] |= mask[..., :, :-k]
        cur[..., :, :-k] |= mask[..., :, k:]
        rows.append(cur)
    out = np.zeros_like(mask)
    for dy in range(-r_int, r_int + 1):
        if abs(dy) >= h:
            continue
        seg = rows[min(_half_width(radius, dy), len(rows) - 1)]
        if dy > 0:
            out[..., dy:, :] |= seg[..., :-dy, :]
        elif dy < 0:
            out[..., :dy, :] |= seg[..., -dy:, :]
        else:
            out |= seg
    return out


def _f_frame(pred, gt, bound_th):
    bp, bg = seg2bmap(pred), seg2bmap(gt)
    n_pred, n_gt = np.count_nonzero(bp), np.count_nonzero(bg)
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    radius = boundary_radius(pred.shape, bound_th)
    precision = np.count_nonzero(bp & dilate_disk(bg, radius)) / n_pred
    recall = np.count_nonzero(bg & dilate_disk(bp, radius)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def f_measure(pred, gt, bound_th=0.008):
    """Boundary F-measure of the DAVIS evaluation.

    Boundaries by ``seg2bmap``; each is dilated by the disk of radius ``boundary_radius``;
    precision = |Bp ∧ dil(Bg)| / |Bp|, recall = |Bg ∧ dil(Bp)| / |Bg|, F = 2PR / (P + R) (0 when
    P + R = 0); F = 1 when both boundaries are empty and 0 when exactly one is.

    Args:
        pred, gt: (H, W) masks, or stacks (..., H, W) of the same shape (evaluated frame by frame).
        bound_th: fraction of the image diagonal (< 1) or a radius in pixels (>= 1).
    Returns:
        a float for (H, W) inputs, else a float64 array of the leading shape (e.g. (N,)).
    """
    pred, gt = _pair(pred, gt)
    if pred.ndim == 2:
        return _f_frame(pred, gt, bound_th)
    lead = pred.shape[:-2]
    p = pred.reshape(-1, *pred.shape[-2:])
    g = gt.reshape(-1, *gt.shape[-2:])
    return np.array([_f_frame(p[i], g[i], bound_th) for i in range(p.shape[0])],
                    dtype=np.float64).reshape(lead)


def sequence_measures(pred, gt, bound_th=0.008):
    """Per-frame J and F of one sequence: ``pred``/``gt`` are (N, H, W) stacks; returns
    {"J": (N,) array, "F": (N,) array}, the input of ``davis_scores``."""
    pred, gt = _pair(pred, gt)
    if pred.ndim != 3:
        raise ValueError(f"expected (N, H, W) stacks, got shape {pred.shape}")
    return {"J": j_measure(pred, gt), "F": f_measure(pred, gt, bound_th)}


# --------------------------------------------------------------------------------------------
# Per-sequence statistics, global scores and the CSV files
# --------------------------------------------------------------------------------------------

def decay_indices(n, bins=DECAY_BINS):
    """The ``bins + 1`` bin edges of the Decay: round(linspace(1, n, bins + 1)) - 1 in int64.

    Ties (x.5, which happen when n - 1 ≡ 2 mod 4) round up, as the official code does by adding
    1e-10 before np.round; its cast of the ids to uint8 (which wraps for n > 256) is not copied.
    """
    edges = np.linspace(1, n, bins + 1)
    return np.floor(edges + 0.5).astype(np.int64) - 1


def statistics(values):
    """Per-sequence statistics of per-frame values (J or F), as in the DAVIS evaluation.

    mean = mean over frames; recall = fraction of frames with value > 0.5; decay: with
    ids = ``decay_indices(N)``, bins v[ids[q] : ids[q+1] + 1] for q = 0..3 (neighbouring bins share
    an endpoint), decay = mean(bin 0) - mean(bin 3). NaN values are ignored as by np.nanmean.

    Short sequences need no special case: the bins are never empty for N >= 1. N = 1 gives
    decay 0 (every bin is the one frame); N = 2 gives v[0] - v[1]; N = 3, 4 use the same formula
    (N = 3: ids = 0, 1, 1, 2, 2, decay = mean(v[0:2]) - v[2]). N = 0 gives (nan, nan, nan).

    Returns:
        Statistics(mean, recall, decay), a named tuple of floats.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    n = v.size
    if n == 0:
        return Statistics(math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN slices -> nan, silently
        mean = float(np.nanmean(v))
        recall = float(np.mean(v > 0.5))
        ids = decay_indices(n)
        bins = [v[ids[q]:ids[q + 1] + 1] for q in range(DECAY_BINS)]
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[-1]))
    return Statistics(mean, recall, decay)


def davis_scores(per_sequence):
    """Global and per-sequence scores of the DAVIS evaluation.

    Args:
        per_sequence: {name: {"J": per-frame J values, "F": per-frame F values}} (arrays or
            lists), in the order the rows should have (e.g. that of the ImageSets file). The
            official tool names its rows ``<sequence>_<object id>`` (``blackswan_1``); the names
            are written as given here.
    Returns:
        (global_row, per_sequence_rows): global_row is a dict with the keys ``GLOBAL_COLUMNS`` in
        order, each the mean over sequences of the per-sequence statistic, and
        J&F-Mean = (J-Mean + F-Mean) / 2; per_sequence_rows is a list of dicts with the keys
        ``SEQUENCE_COLUMNS`` (Sequence, J-Mean, F-Mean). Values are plain floats.
    """
    if not per_sequence:
        raise ValueError("davis_scores needs at least one sequence")
    stats = {}
    rows = []
    for name, measures in per_sequence.items():
        j, f = statistics(measures["J"]), statistics(measures["F"])
        stats[name] = (j, f)
        rows.append({"Sequence": str(name), "J-Mean": j.mean, "F-Mean": f.mean})

    def across(measure, field):
        return float(np.mean([getattr(s[measure], field) for s in stats.values()]))

    j_mean, f_mean = across(0, "mean"), across(1, "mean")
    global_row = {
        "J&F-Mean": (j_mean + f_mean) / 2.0,
        "J-Mean": j_mean, "J-Recall": across(0, "recall"), "J-Decay": across(0, "decay"),
        "F-Mean": f_mean, "F-Recall": across(1, "recall"), "F-Decay": across(1, "decay"),
    }
    return global_row, rows


def _format(value, float_format):
    if isinstance(value, (float, np.floating)):
        return float_format % value
    return str(value)


def _write_atomic(path, header, rows, float_format):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            for row in rows:
                writer.writerow([_format(row[key], float_format) for key in header])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_csvs(folder, set_name, global_row, per_sequence_rows, float_format="%.3f"):
    """Write ``global_results-<set_name>.csv`` (header ``GLOBAL_COLUMNS``, one row) and
    ``per-sequence_results-<set_name>.csv`` (header ``SEQUENCE_COLUMNS``, one row per sequence)
    into ``folder`` (created if needed), each written to a temporary file then moved into place
    with os.replace, so a reader never sees a partial file.

    Floats are written with ``float_format``: "%.3f" by default, as the official DAVIS tool writes
    them (pandas ``to_csv(index=False, float_format="%.3f")``); "\\n" line endings, no index
    column, csv quoting where a sequence name needs it. Returns (global_path, per_sequence_path).
    """
    os.makedirs(folder, exist_ok=True)
    global_path = os.path.join(folder, f"global_results-{set_name}.csv")
    sequence_path = os.path.join(folder, f"per-sequence_results-{set_name}.csv")
    _write_atomic(global_path, GLOBAL_COLUMNS, [global_row], float_format)
    _write_atomic(sequence_path, SEQUENCE_COLUMNS, per_sequence_rows, float_format)
    return global_path, sequence_path


# --------------------------------------------------------------------------------------------
# Saliency-style metrics (FBMS, ViSal)
# --------------------------------------------------------------------------------------------

def _saliency_frames(prob, gt):
    """Pairs (prob (H, W) float64 in [0, 1], gt (H, W) bool) from arrays (H, W) / (..., H, W) or
    from equal-length sequences of (H, W) arrays (frames of different sizes)."""
    if isinstance(prob, (list, tuple)) or isinstance(gt, (list, tuple)):
        if len(prob) != len(gt):
            raise ValueError(f"{len(prob)} probability maps but {len(gt)} ground-truth masks")
        pairs = [(np.asarray(p, dtype=np.float64), np.asarray(g)) for p, g in zip(prob, gt)]
    else:
        p, g = np.asarray(prob, dtype=np.float64), np.asarray(gt)
        if p.ndim < 2:
            raise ValueError(f"maps must be (H, W) or (..., H, W), got shape {p.shape}")
        if p.shape != g.shape:
            raise ValueError(f"probability shape {p.shape} != ground-truth shape {g.shape}")
        pairs = list(zip(p.reshape(-1, *p.shape[-2:]), g.reshape(-1, *g.shape[-2:])))
    out = []
    for p, g in pairs:
        if p.shape != g.shape:
            raise ValueError(f"probability shape {p.shape} != ground-truth shape {g.shape}")
        if p.size and (p.min() < 0.0 or p.max() > 1.0):
            raise ValueError("probabilities must lie in [0, 1] (divide 8-bit maps by 255)")
        out.append((p, g > 0.5))            # bool, 0/1 and 0/255 ground truth alike
    if not out:
        raise ValueError("no frames to evaluate")
    return out


def mae(prob, gt):
    """Mean absolute error between probabilities in [0, 1] and the binary ground truth: mean over
    the pixels of each frame, then over frames (the usual saliency convention; the same as the
    pixel mean when all frames have one size).

    Args:
        prob: (H, W) or (..., H, W) array, or a list of (H, W) arrays, values in [0, 1].
        gt: the same layout; binarised with > 0.5 (bool, 0/1 and 0/255 masks work).
    Returns:
        float.
    """
    return float(np.mean([np.mean(np.abs(p - g)) for p, g in _saliency_frames(prob, gt)]))


def max_f_measure(prob, gt, beta2=0.3, thresholds=256, average="pr"):
    """Maximum F-measure over binarisation thresholds, for saliency-style evaluation.

    Each frame is binarised with ``prob >= t`` for every threshold t (``thresholds`` evenly
    spaced values in [0, 1], i.e. k/255 for 256, the 8-bit levels, or an explicit array).
    Per frame and threshold, precision = TP / (TP + FP) and recall = TP / |G| (0 where the
    denominator is 0). With ``average="pr"`` (default, the convention of the salient object
    detection benchmarks) precision and recall are averaged over frames per threshold and
    F(t) = (1 + β²) P̄ R̄ / (β² P̄ + R̄); with ``average="f"`` the per-frame F(t) curves are averaged
    instead. F is 0 where its denominator is 0. Returns max over t of F(t) as a float.

    Args:
        prob: (H, W) or (..., H, W) array, or a list of (H, W) arrays, values in [0, 1].
        gt: the same layout; binarised with > 0.5.
        beta2: β² (0.3 as is standard, weighting precision more than recall).
        thresholds: number of thresholds or a 1-D array of them.
        average: "pr" or "f", see above.
    """
    if average not in ("pr", "f"):
        raise ValueError(f"unknown average {average!r}; expected 'pr' or 'f'")
    t = (np.linspace(0.0, 1.0, int(thresholds)) if np.ndim(thresholds) == 0
         else np.asarray(thresholds, dtype=np.float64).ravel())
    precisions, recalls = [], []
    for p, g in _saliency_frames(prob, gt):
        fg = np.sort(p[g])
        bg = np.sort(p[~g])
        tp = fg.size - np.searchsorted(fg, t, side="left")         # count of fg values >= t
        fp = bg.size - np.searchsorted(bg, t, side="left")
        precisions.append(np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0))
        recalls.append(tp / fg.size if fg.size else np.zeros(t.shape))
    precisions, recalls = np.stack(precisions), np.stack(recalls)

    def f_curve(pr, rc):
        den = beta2 * pr + rc
        return np.where(den > 0, (1.0 + beta2) * pr * rc / np.where(den > 0, den, 1.0), 0.0)

    if average == "pr":
        curve = f_curve(precisions.mean(0), recalls.mean(0))
    else:
        curve = f_curve(precisions, recalls).mean(0)
    return float(curve.max())
