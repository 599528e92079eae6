"""d2conv.data: the synthetic generator, DAVIS / YouTube-VOS readers, clip sampling and mixing."""
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2conv.data import (ClipDataset, WeightedMix, build_clips, davis_sequences,
                         load_frame, load_mask, sample_frames, youtube_vos_sequences)
from d2conv.data import synthetic

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
    root = tmp_path / "s"
    synthetic.ensure(root, **TINY)
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    synthetic.ensure(root, **TINY)
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp
    assert "regenerating" not in capsys.readouterr().out
    synthetic.ensure(root, **{**TINY, "n_val": 2})
    assert "regenerating" in capsys.readouterr().out
    assert json.loads((root / "synthetic.json").read_text())["n_val"] == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
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


def test_synthetic_cli(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "c"), "--train", "1", "--val", "1", "--frames", "3",
                    "--height", "32", "--width", "48", "--seed", "5"])
    assert "2 videos" in capsys.readouterr().out
    assert load_frame(tmp_path / "c/JPEGImages/480p/val_000/00002.jpg").shape == (32, 48, 3)


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
    for n, i in [(20, 10), (20, 0), (20, 19), (6, 3), (3, 1)]:
        for _ in range(20):
            ids = sample_frames(n, i, 4, 4, rng)
            assert len(ids) == 4 and (np.diff(ids) >= 0).all()
            assert max(0, i - 4) <= ids.min() and ids.max() < min(n, i + 4)
            if min(n, i + 4) - max(0, i - 4) >= 4:
                assert len(set(ids.tolist())) == 4                      # no repeats
    assert sample_frames(20, 10, 8, 4, rng).tolist() == list(range(6, 14))


def test_clip_epochs_and_padding(tmp_path):
    seqs = davis_sequences(make_davis(tmp_path / "davis", n=9), "train")
    ds = ClipDataset(seqs, clip_len=3, half_window=4, augment=True, color_jitter=True, seed=1)
    assert len(ds) == 18
    s = ds[4]
    assert s["clip"].shape == (3, 3, 32, 32) and s["clip"].dtype == torch.float32
    assert s["target"].shape == (1, 3, 32, 32) and s["valid"].dtype == torch.bool
    assert s["name"] == "a" and s["size"].tolist() == [20, 30]
    assert not s["valid"][..., 20:, :].any() and not s["valid"][..., 30:].any()
    assert (s["clip"][:, :, 20:] == 0).all() and 0 <= s["clip"].min() and s["clip"].max() <= 1
    same = [ds[k]["frames"].tolist() for k in range(18)]
    assert same == [ds[k]["frames"].tolist() for k in range(18)]
    assert torch.equal(ds[4]["clip"], s["clip"])
    ds.set_epoch(1)
    assert same != [ds[k]["frames"].tolist() for k in range(18)]
    plain = ClipDataset(seqs, clip_len=3)[4]
    ids = plain["frames"].tolist()
    expected = torch.from_numpy(np.stack([load_mask(seqs[0].masks[k]) for k in ids])).float()
    assert torch.equal(plain["target"][0, :, :20, :30], expected)
    assert plain["valid"][..., :20, :30].all()


def test_clip_flip_is_per_clip(tmp_path):
    seqs = davis_sequences(make_davis(tmp_path / "davis", n=9), "train")
    plain = ClipDataset(seqs, clip_len=4, half_window=2)
    flips = ClipDataset(seqs, clip_len=4, half_window=2, augment=True, scale_jitter=None)
    for k in range(8):
        a, b = plain[k]["target"][..., :20, :30], flips[k]["target"][..., :20, :30]
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
    assert s["valid"][0, :, :20, :30].all(dim=(1, 2)).tolist() == annotated
    assert not s["valid"][0, [not a for a in annotated]].any()
    with pytest.raises(FileNotFoundError, match="valid/JPEGImages"):
        youtube_vos_sequences(root, "valid")


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
