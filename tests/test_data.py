"""d2conv.data: the synthetic generator, DAVIS / YouTube-VOS readers, clip sampling and mixing."""
import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2conv.data import (ClipDataset, WeightedMix, build_clips, check_files, dataset_root,
                         davis_sequences, load_frame, load_mask, read_frames, sample_frames,
                         split_sequences, youtube_vos_sequences)
from d2conv.data import synthetic
from d2conv.errors import BadInput, InputError
from d2conv.evaluation import evaluate_results, write_mask

TINY = dict(n_train=2, n_val=1, frames=10, height=64, width=96)


def files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("synth") / "data", **{**TINY, "n_train": 8})


# ---- the synthetic generator -------------------------------------------------------------------
def test_synthetic_deterministic(tmp_path):
    a, b = synthetic.generate(tmp_path / "a", **TINY), synthetic.generate(tmp_path / "b", **TINY)
    fa = files(a)
    assert fa == files(b)
    assert len([k for k in fa if k.endswith(".jpg")]) == 30 and "synthetic.json" in fa
    assert fa["ImageSets/2016/val.txt"] == fa["ImageSets/2017/val.txt"] == b"val_000\n"
    c = synthetic.generate(tmp_path / "c", **TINY, seed=1)
    first = "JPEGImages/480p/train_000/00000.jpg"
    assert files(c)[first] != fa[first]
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old-*"))


def test_synthetic_masks_move_and_scale(synth):
    seqs = davis_sequences(synth, "train") + davis_sequences(synth, "val")
    assert len(seqs) == 9
    scaled = 0
    for seq in seqs:
        ids = np.stack([np.asarray(Image.open(p)) for p in seq.masks])      # (T, H, W)
        assert Image.open(seq.masks[0]).mode == "P"
        assert ids.shape == (10, 64, 96) and ids.any(axis=(1, 2)).all()    # every frame non-empty
        objects = np.unique(ids[ids > 0])
        assert 1 <= len(objects) <= 3 and objects.tolist() == list(range(1, len(objects) + 1))
        ratios = [(ids[7] == k).sum() / max((ids[0] == k).sum(), 1) for k in objects]
        scaled += any(r < 0.8 or r > 1.25 for r in ratios)
        assert (ids[0] != ids[7]).sum() > 20                                # something moved
    assert scaled >= 0.75 * len(seqs)


def test_synthetic_lookalikes_are_static_copies():
    plan = synthetic._plan_video(np.random.default_rng(3), 10, 64, 96)
    salient = [l for l in plan["layers"] if l["id"] > 0]
    static = [l for l in plan["layers"] if l["id"] == 0]
    assert any(any(s["shape"] is o["shape"] and s["texture"] is o["texture"] for o in salient)
               for s in static)
    for s in static:        # fixed to the background: screen position + pan is constant
        world = s["cx"] + plan["pan"][0], s["cy"] + plan["pan"][1]
        assert np.allclose(world[0], world[0][0]) and np.allclose(world[1], world[1][0])


def test_synthetic_ensure(tmp_path, capsys):
    """Written on first use; a set written with other parameters (by the command line) is used
    as it is and said so, never overwritten; one of an older generator is rewritten with its own
    parameters."""
    root = tmp_path / "s"
    synthetic.ensure(root, **TINY)
    assert "writing" in capsys.readouterr().out
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    synthetic.ensure(root, **TINY)
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == ""
    synthetic.ensure(root, **{**TINY, "n_val": 2})
    assert "as it was written" in capsys.readouterr().out
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp
    assert json.loads((root / "synthetic.json").read_text())["n_val"] == 1
    params = json.loads((root / "synthetic.json").read_text())
    (root / "synthetic.json").write_text(json.dumps({**params, "format": 1}))
    synthetic.ensure(root, **{**TINY, "n_val": 2})
    assert "older generator" in capsys.readouterr().out
    assert json.loads((root / "synthetic.json").read_text()) == params      # its own parameters
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("keep me")
    with pytest.raises(InputError, match="mine"):
        synthetic.ensure(tmp_path / "mine", **TINY)


def test_synthetic_ensure_concurrent(tmp_path):
    """Two DDP ranks asking at once: one generates, the other waits and reuses it."""
    ctx = multiprocessing.get_context("fork")
    params = dict(TINY, n_train=1, frames=3)
    procs = [ctx.Process(target=synthetic.ensure, args=(tmp_path / "s",), kwargs=params)
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "s.lock"]
    assert len(davis_sequences(tmp_path / "s", "train")[0]) == 3


def test_synthetic_cli(tmp_path, capsys, monkeypatch):
    """Regenerated by hand with other sizes, the set is what the next run trains on."""
    monkeypatch.chdir(tmp_path)
    synthetic.main(["--out", "data/synthetic", "--train", "1", "--val", "1", "--frames", "3",
                    "--height", "32", "--width", "48", "--seed", "5"])
    assert "2 videos" in capsys.readouterr().out
    assert load_frame("data/synthetic/JPEGImages/480p/val_000/00002.jpg").shape == (32, 48, 3)
    root = dataset_root("synthetic")                                    # the default parameters
    assert root == Path("data/synthetic") and "32x48" in capsys.readouterr().out
    assert load_frame(root / "JPEGImages/480p/val_000/00002.jpg").shape == (32, 48, 3)
    assert synthetic.default_root(height=128, width=224) == Path("data/synthetic-128x224")


# ---- a hand-made DAVIS folder ------------------------------------------------------------------
def make_davis(root: Path, names=("a", "b"), n=5, hw=(20, 30), folder="Annotations"):
    """Frames n x (20, 30), palette masks with ids 1 (left block) and 2 (a row) in
    ``folder``/480p (no Annotations_unsupervised: the fallback)."""
    rng = np.random.default_rng(0)
    for name in names:
        (root / "JPEGImages/480p" / name).mkdir(parents=True)
        (root / folder / "480p" / name).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(
                root / "JPEGImages/480p" / name / f"{k:05d}.jpg")
            ids = np.zeros(hw, np.uint8)
            ids[2:8, 1 + k:6 + k] = 1
            ids[12, :] = 2
            mask = Image.fromarray(ids)
            mask.putpalette(synthetic.PALETTE)
            mask.save(root / folder / "480p" / name / f"{k:05d}.png")
    for year in ("2016", "2017"):
        (root / "ImageSets" / year).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            (root / "ImageSets" / year / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_davis_fallback_and_union_mask(tmp_path):
    root = make_davis(tmp_path / "davis")
    seqs = davis_sequences(root, "train", year=2017)
    assert [s.name for s in seqs] == ["a", "b"] and len(seqs[0]) == 5
    assert seqs[0].masks[3] == root / "Annotations/480p/a/00003.png"
    mask = load_mask(seqs[0].masks[0])
    assert mask.dtype == bool and mask.shape == (20, 30)
    assert mask.sum() == 6 * 5 + 30 and mask[12].all() and mask[2:8, 1:6].all()
    assert load_frame(seqs[0].frames[0]).dtype == np.uint8


def make_davis2016(root: Path, train=("bear",), val=("cows", "dog"), n=4, hw=(20, 30)):
    """The DAVIS-2016 release: 0/255 grayscale masks in Annotations/480p and path pairs in
    ImageSets/480p/{train,val}.txt."""
    rng = np.random.default_rng(1)
    for split, names in (("train", train), ("val", val)):
        lines = []
        for name in names:
            (root / "JPEGImages/480p" / name).mkdir(parents=True)
            (root / "Annotations/480p" / name).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(
                    root / "JPEGImages/480p" / name / f"{k:05d}.jpg")
                mask = np.zeros(hw, np.uint8)
                mask[3:9, 2 + k:9 + k] = 255
                Image.fromarray(mask).save(root / "Annotations/480p" / name / f"{k:05d}.png")
                lines.append(f"/JPEGImages/480p/{name}/{k:05d}.jpg "
                             f"/Annotations/480p/{name}/{k:05d}.png")
        (root / "ImageSets/480p").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets/480p" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def copy_masks(sequences, results):
    """Write each sequence's masks as result PNGs (a perfect prediction of those masks)."""
    for seq in sequences:
        for m in seq.masks:
            write_mask(results / seq.name / m.name, load_mask(m))


def test_davis2016_release_layout(tmp_path):
    """Path pairs are read as sequence names, for training, validation and evaluation."""
    root = make_davis2016(tmp_path / "davis2016")
    train, val = split_sequences(root, "train"), split_sequences(root, "val")
    assert [s.name for s in train] == ["bear"] and [s.name for s in val] == ["cows", "dog"]
    assert val[0].masks[2] == root / "Annotations/480p/cows/00002.png" and len(val[0]) == 4
    assert load_mask(val[0].masks[0]).sum() == 6 * 7
    assert build_clips(root, "train", clip_len=2)[0]["target"].sum() == 2 * 6 * 7
    copy_masks(val, tmp_path / "results")
    global_row, rows, _ = evaluate_results(root, tmp_path / "results")
    assert global_row["J&F-Mean"] == 1.0 and [r["Sequence"] for r in rows] == ["cows", "dog"]


def test_davis2017_root_trains_on_unsupervised_and_scores_on_davis2016_truth(tmp_path):
    """In a DAVIS-2017 root training reads Annotations_unsupervised (the union of its
    instances), validation and evaluate.py's DAVIS-2016 scoring read Annotations, never the
    former."""
    root = make_davis(tmp_path / "davis")                       # Annotations: ids 1 and 2
    make_davis(tmp_path / "other", folder="Annotations_unsupervised")
    (tmp_path / "other/Annotations_unsupervised").rename(root / "Annotations_unsupervised")
    for png in (root / "Annotations_unsupervised/480p").rglob("*.png"):   # instance 2 only
        ids = np.asarray(Image.open(png))
        mask = Image.fromarray(np.where(ids == 2, 2, 0).astype(np.uint8))
        mask.putpalette(synthetic.PALETTE)
        mask.save(png)
    train, val = split_sequences(root, "train"), split_sequences(root, "val")
    assert train[0].masks[0].parts[-4] == "Annotations_unsupervised"
    assert val[0].masks[0].parts[-4] == "Annotations"
    assert load_mask(train[0].masks[0]).sum() == 30 and load_mask(val[0].masks[0]).sum() == 60
    copy_masks(val, tmp_path / "right")
    assert evaluate_results(root, tmp_path / "right")[0]["J&F-Mean"] == 1.0
    copy_masks(train, tmp_path / "wrong")        # the unsupervised masks score below 1
    assert evaluate_results(root, tmp_path / "wrong")[0]["J-Mean"] == pytest.approx(0.5)


@pytest.mark.parametrize("line", ["../../escape", "/JPEGImages/480p/../../x/00000.jpg "
                                  "/Annotations/480p/x/00000.png", "..", ".", "a\\b"])
def test_image_set_names_stay_inside_the_root(tmp_path, line):
    """A name that would climb out of the folder it is joined to: one error naming the file,
    the line and why."""
    from d2conv.data.davis import read_image_set

    listing = tmp_path / "val.txt"
    listing.write_text(f"bear\n\n{line}\n")
    with pytest.raises(BadInput, match=rf"val.txt, line 3: .*(\.\.|plain name)"):
        read_image_set(listing)
    listing.write_text("bear\n/JPEGImages/480p/car/00000.jpg /Annotations/480p/car/00000.png\n")
    assert read_image_set(listing) == ["bear", "car"]


def test_davis_root_without_image_sets(tmp_path):
    root = make_davis(tmp_path / "davis")
    shutil.rmtree(root / "ImageSets")
    with pytest.raises(InputError, match="ImageSets/2017/train.txt.*ImageSets/480p/train.txt"):
        split_sequences(root, "train")


def test_header_check_names_a_corrupt_or_odd_file(tmp_path):
    root = make_davis(tmp_path / "davis")
    seqs = split_sequences(root, "train")
    assert check_files(seqs) == 2 * 5 * 2
    bad = seqs[1].frames[3]
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(BadInput, match="b/00003.jpg"):
        check_files(seqs)
    Image.fromarray(np.zeros((21, 30, 3), np.uint8)).save(bad)
    with pytest.raises(BadInput, match="b/00003.jpg is 30x21"):
        check_files(seqs)


def test_mask_formats(tmp_path):
    ids = np.zeros((4, 5), np.uint8)
    ids[1, 1], ids[2, 3] = 255, 3
    Image.fromarray(np.where(ids > 0, 255, 0).astype(np.uint8)).save(tmp_path / "gray.png")
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[1, 1], rgb[2, 3] = (128, 0, 0), (0, 0, 1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    expected = ids > 0
    assert (load_mask(tmp_path / "gray.png") == expected).all()
    assert (load_mask(tmp_path / "rgb.png") == expected).all()


def test_davis_errors(tmp_path):
    root = make_davis(tmp_path / "davis")
    with pytest.raises(FileNotFoundError, match="ImageSets/2017/test.txt"):
        davis_sequences(root, "test")
    (root / "ImageSets/2017/val.txt").write_text("a\nmissing\n")
    with pytest.raises(FileNotFoundError, match="JPEGImages/480p/missing"):
        davis_sequences(root, "val")
    (root / "Annotations/480p/b/00004.png").unlink()
    with pytest.raises(ValueError, match="5 frames.*4 masks"):
        davis_sequences(root, "train")
    bad = root / "JPEGImages/480p/a/00001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="00001.jpg"):
        load_frame(bad)
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        load_mask(root / "nothing.png")
    with pytest.raises(FileNotFoundError, match="not_davis"):
        build_clips(tmp_path / "not_davis", "train")
    (tmp_path / "not_davis").mkdir()
    with pytest.raises(FileNotFoundError, match="not_davis/JPEGImages/480p"):
        build_clips(tmp_path / "not_davis", "train")
    with pytest.raises(FileNotFoundError, match="ImageSets/2016/val.txt"):
        (root / "ImageSets/2016/val.txt").unlink()
        build_clips(root, "val")


# ---- clips -------------------------------------------------------------------------------------
def test_sample_frames_window():
    rng = np.random.default_rng(0)
    for replace in (True, False):
        for n, i in [(20, 10), (20, 0), (20, 19), (6, 3), (3, 1)]:
            for _ in range(20):
                ids = sample_frames(n, i, 4, 4, rng, replace)
                assert len(ids) == 4 and (np.diff(ids) >= 0).all()
                assert max(0, i - 4) <= ids.min() and ids.max() < min(n, i + 4)
                if not replace and min(n, i + 4) - max(0, i - 4) >= 4:
                    assert len(set(ids.tolist())) == 4                  # no repeats
    # without replacement, 8 from the 8-frame window is always the same 8 consecutive frames
    assert all(sample_frames(20, 10, 8, 4, rng, replace=False).tolist() == list(range(6, 14))
               for _ in range(10))


def test_sample_frames_with_replacement_as_the_original():
    """8 draws with replacement from [i - 4, i + 4): uniform over the window, sorted, about
    8 (1 - (7/8)^8) = 5.25 distinct frames, and new draws differ."""
    rng = np.random.default_rng(1)
    draws = np.stack([sample_frames(20, 10, 8, 4, rng) for _ in range(4000)])
    assert (np.diff(draws, axis=1) >= 0).all() and draws.min() == 6 and draws.max() == 13
    distinct = np.mean([len(set(d.tolist())) for d in draws])
    assert 5.15 < distinct < 5.35
    assert np.allclose(np.bincount(draws.ravel() - 6, minlength=8) / draws.size, 1 / 8,
                       atol=0.01)
    assert len({tuple(d) for d in draws[:50]}) > 40
    near_start = np.stack([sample_frames(20, 1, 8, 4, rng) for _ in range(200)])
    assert near_start.min() == 0 and near_start.max() == 4          # the window [0, 5)


def content(x, hw=(20, 30), padded=(32, 32)):
    """The part of a padded sample that holds the frames: padding is split evenly between the
    two sides (an odd pixel at the bottom / right)."""
    top, left = ((p - n) // 2 for p, n in zip(padded, hw))
    return x[..., top:top + hw[0], left:left + hw[1]]


def test_clip_epochs_and_padding(tmp_path):
    seqs = davis_sequences(make_davis(tmp_path / "davis", n=9), "train")
    ds = ClipDataset(seqs, clip_len=3, half_window=4, augment=True, color_jitter=True, seed=1)
    assert len(ds) == 18
    s = ds[4]
    assert s["clip"].shape == (3, 3, 32, 32) and s["clip"].dtype == torch.float32
    assert s["target"].shape == (1, 3, 32, 32) and s["valid"].dtype == torch.bool
    assert s["name"] == "a" and s["size"].tolist() == [20, 30]
    # 20 -> 32 rows: 6 above and 6 below; 30 -> 32 columns: 1 left and 1 right
    assert not s["valid"][..., :6, :].any() and not s["valid"][..., 26:, :].any()
    assert not s["valid"][..., :1].any() and not s["valid"][..., 31:].any()
    assert (s["clip"][:, :, :6] == 0).all() and (s["clip"][:, :, 26:] == 0).all()
    assert 0 <= s["clip"].min() and s["clip"].max() <= 1
    same = [ds[k]["frames"].tolist() for k in range(18)]
    assert same == [ds[k]["frames"].tolist() for k in range(18)]
    assert torch.equal(ds[4]["clip"], s["clip"])
    ds.set_epoch(1)
    assert same != [ds[k]["frames"].tolist() for k in range(18)]
    plain = ClipDataset(seqs, clip_len=3)[4]
    ids = plain["frames"].tolist()
    expected = torch.from_numpy(np.stack([load_mask(seqs[0].masks[k]) for k in ids])).float()
    assert torch.equal(content(plain["target"][0]), expected)
    assert content(plain["valid"]).all() and plain["valid"].sum() == 3 * 20 * 30


def test_clips_redrawn_every_epoch_with_replacement(tmp_path):
    """An interior frame's clip changes from epoch to epoch with replacement; without, an 8-frame
    window always gives the same clip (the redraw does nothing)."""
    seqs = davis_sequences(make_davis(tmp_path / "davis", n=12), "train")
    for replace, changes in ((True, True), (False, False)):
        ds = ClipDataset(seqs, clip_len=8, half_window=4, replace=replace, seed=2)
        first = ds[6]["frames"].tolist()
        ds.set_epoch(1)
        assert (ds[6]["frames"].tolist() != first) == changes
        if replace:
            assert len(set(first)) < 8                      # some frame repeats


def test_padding_does_not_count_in_the_loss(tmp_path):
    from d2conv.losses import SegmentationLoss
    seqs = davis_sequences(make_davis(tmp_path / "davis", n=9), "train")
    batch = torch.utils.data.default_collate([ClipDataset(seqs, clip_len=3)[k] for k in (0, 5)])
    logits = torch.randn_like(batch["target"])
    changed = logits.clone()
    changed[~batch["valid"]] = 50.0
    for kind in ("lovasz", "bce", "bce+lovasz"):
        loss = SegmentationLoss(kind)
        assert torch.equal(loss(logits, batch["target"], batch["valid"]),
                           loss(changed, batch["target"], batch["valid"]))


def test_clip_flip_is_per_clip(tmp_path):
    seqs = davis_sequences(make_davis(tmp_path / "davis", n=9), "train")
    plain = ClipDataset(seqs, clip_len=4, half_window=2)
    flips = ClipDataset(seqs, clip_len=4, half_window=2, augment=True, scale_jitter=None)
    for k in range(8):
        a, b = content(plain[k]["target"]), content(flips[k]["target"])
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)


def test_resize(tmp_path):
    seqs = davis_sequences(make_davis(tmp_path / "davis"), "train")
    s = ClipDataset(seqs, clip_len=2, size=(40, 70), augment=True)[0]
    assert s["clip"].shape == (3, 2, 64, 96) and s["size"].tolist() == [40, 70]
    assert set(s["target"].unique().tolist()) <= {0.0, 1.0}


def test_youtube_vos_sparse(tmp_path):
    root = tmp_path / "ytvos"
    make_davis(root, names=("v1",), n=10)                   # then move to the YouTube-VOS layout
    (root / "train").mkdir()
    (root / "JPEGImages/480p").rename(root / "train/JPEGImages")
    (root / "train/Annotations/v1").mkdir(parents=True)
    for k in (0, 5):                                        # every 5th frame annotated
        name = f"v1/{k:05d}.png"
        (root / "Annotations/480p" / name).rename(root / "train/Annotations" / name)
    seqs = youtube_vos_sequences(root)
    assert [m is not None for m in seqs[0].masks] == [k % 5 == 0 for k in range(10)]
    s = ClipDataset(seqs, clip_len=8, half_window=4)[4]
    annotated = [k % 5 == 0 for k in s["frames"].tolist()]
    assert content(s["valid"][0]).all(dim=(1, 2)).tolist() == annotated
    assert not s["valid"][0, [not a for a in annotated]].any()
    with pytest.raises(FileNotFoundError, match="valid/JPEGImages"):
        youtube_vos_sequences(root, "valid")


def test_frames_of_two_sizes_are_named(tmp_path):
    """One reader decodes frames for training and evaluation: uint8 (N, 3, H, W), and a frame of
    another size named beside the first."""
    seqs = davis_sequences(make_davis(tmp_path / "davis"), "train")
    frames = read_frames(seqs[0], [4, 0])
    assert frames.dtype == torch.uint8 and frames.shape == (2, 3, 20, 30)
    assert torch.equal(frames[1], torch.tensor(load_frame(seqs[0].frames[0])).permute(2, 0, 1))
    Image.fromarray(np.zeros((21, 30, 3), np.uint8)).save(seqs[0].frames[3])
    with pytest.raises(BadInput, match="a/00003.jpg is 30x21, frame .*a/00000.jpg is 30x20"):
        read_frames(seqs[0])
    with pytest.raises(BadInput, match="a/00003.jpg is 30x21"):
        ClipDataset(seqs, clip_len=5, half_window=4, replace=False)[2]


def test_missing_frame_named(tmp_path):
    seqs = davis_sequences(make_davis(tmp_path / "davis"), "train")
    seqs[0].frames[2].unlink()
    with pytest.raises(FileNotFoundError, match="a/00002.jpg"):
        ClipDataset(seqs, clip_len=5, half_window=4)[2]


def test_weighted_mix():
    class Child(list):
        epoch = None

        def set_epoch(self, e):
            self.epoch = e

    children = [Child(range(0, 10)), Child(range(100, 105)), Child(range(200, 250))]
    mix = WeightedMix(children, [0.25, 0.45, 0.3], length=4000, seed=2)
    picks = np.array([mix.choose(k)[0] for k in range(len(mix))])
    assert np.allclose(np.bincount(picks, minlength=3) / len(picks), [0.25, 0.45, 0.3], atol=0.03)
    assert mix[7] == children[mix.choose(7)[0]][mix.choose(7)[1]]
    before = [mix.choose(k) for k in range(50)]
    mix.set_epoch(3)
    assert all(c.epoch == 3 for c in children) and before != [mix.choose(k) for k in range(50)]
    with pytest.raises(ValueError):
        WeightedMix(children, [1, 1], length=10)


def test_workers_follow_epoch(tmp_path):
    seqs = davis_sequences(make_davis(tmp_path / "davis", n=9), "train")
    ds = ClipDataset(seqs, clip_len=3, half_window=4, seed=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=1, persistent_workers=True)
    for epoch in range(2):
        ds.set_epoch(epoch)
        got = torch.cat([b["frames"] for b in loader])
        assert torch.equal(got, torch.stack([ds[k]["frames"] for k in range(len(ds))]))
