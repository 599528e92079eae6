"""A procedural video dataset in the DAVIS layout (docs/davis.md), small enough to train on a CPU.

Each video: a textured background seen through a slow camera pan; 1-3 salient objects
(ellipses, rectangles, star polygons with their own texture, at least 13-18 % of the frame's
smaller side across their radius) that move 3-10 times faster than the pan and grow or shrink by
x1.5-2.2 over about 8 frames (so a fixed dilation cannot follow them); 1-2 smaller static
look-alikes (copies of the salient objects' shapes and textures, fixed to the background: only
motion decides what is salient); sometimes a static occluder in front of a salient object's path,
and objects that leave the frame partly. The defaults (48 training videos of 20 frames at 64x96)
let the tiny model train on two CPU cores in minutes. Written files:

    ROOT/JPEGImages/480p/<seq>/00000.jpg          RGB, height x width
    ROOT/Annotations/480p/<seq>/00000.png         palette PNG, 0 background, 1..k objects
    ROOT/ImageSets/{2016,2017}/{train,val}.txt    one sequence name a line
    ROOT/synthetic.json                           the parameters

(a DAVIS-2017 root without ``Annotations_unsupervised``: training and the DAVIS-2016 protocol
both read ``Annotations``). The same seed and parameters give byte-identical files (every video
draws from its own ``numpy.random.Generator`` seeded by (seed, split, index)).

    python -m d2conv.data.synthetic --out data/synthetic --train 48 --val 8
"""
import argparse
import fcntl
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import BadInput, InputError
from ..progress import progress

__all__ = ["DEFAULTS", "FORMAT", "generate", "ensure", "default_root", "main"]

DEFAULTS = dict(n_train=48, n_val=8, frames=20, height=64, width=96, seed=0)
FORMAT = 3                     # bump when the generator changes: ensure() then regenerates
_SPLITS = {"train": 0, "val": 1}


def _palette() -> list:
    """The DAVIS/VOC colour map: id 0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), ..."""
    out = []
    for i in range(256):
        r = g = b = 0
        for bit in range(8):                    # bits 0, 3, 6, ... of i go to red, 1, 4, ... green
            r |= ((i >> 3 * bit) & 1) << (7 - bit)
            g |= ((i >> 3 * bit + 1) & 1) << (7 - bit)
            b |= ((i >> 3 * bit + 2) & 1) << (7 - bit)
        out += [r, g, b]
    return out


PALETTE = _palette()


# ---- textures: value in [0, 1] mixing two colours, evaluated at arbitrary coordinates ----------
def _random_texture(rng, unit: float) -> dict:
    """Parameters of a texture whose features are about ``unit`` long in its coordinates."""
    kind = str(rng.choice(["stripes", "noise", "blobs", "checker"]))
    return dict(kind=kind, colours=rng.uniform(0.05, 0.95, (2, 3)),
                angle=rng.uniform(0, np.pi), phase=rng.uniform(0, 2 * np.pi),
                period=unit * rng.uniform(0.6, 1.5), grids=rng.random((2, 16, 16)))


def _value_noise(grid, u, v):
    """Smooth periodic noise: ``grid`` (n, n) bilinear-interpolated with a smoothstep at (u, v)
    in cell units."""
    n = grid.shape[0]
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = u - u0, v - v0
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    i0, j0 = u0.astype(np.int64) % n, v0.astype(np.int64) % n
    i1, j1 = (i0 + 1) % n, (j0 + 1) % n
    top = grid[j0, i0] * (1 - fu) + grid[j0, i1] * fu
    bottom = grid[j1, i0] * (1 - fu) + grid[j1, i1] * fu
    return top * (1 - fv) + bottom * fv


def _texture_rgb(tex: dict, u, v):
    """Colour (..., 3) float in [0, 1] of texture ``tex`` at coordinates u, v (...)."""
    c, s = np.cos(tex["angle"]), np.sin(tex["angle"])
    a, b = c * u + s * v, -s * u + c * v
    p = tex["period"]
    if tex["kind"] == "stripes":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * a / p + tex["phase"])
    elif tex["kind"] == "checker":
        t = 0.5 + 0.5 * np.tanh(4 * np.sin(2 * np.pi * a / p) * np.sin(2 * np.pi * b / p))
    else:
        g = tex["grids"]
        t = 0.65 * _value_noise(g[0], a / p, b / p) + 0.35 * _value_noise(g[1], 2 * a / p,
                                                                          2 * b / p)
        if tex["kind"] == "blobs":
            t = np.clip((t - 0.5) * 8 + 0.5, 0, 1)
    c0, c1 = tex["colours"]
    return c0 + t[..., None] * (c1 - c0)


# ---- shapes in local coordinates (about [-1, 1]) ------------------------------------------------
def _random_shape(rng) -> dict:
    kind = str(rng.choice(["ellipse", "rectangle", "polygon"]))
    n = int(rng.integers(5, 9))
    angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n
    radii = rng.uniform(0.6, 1.0, n)
    return dict(kind=kind, aspect=rng.uniform(0.55, 1.0),
                verts=np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1))


def _inside(shape: dict, u, v):
    """Bool array: which local points (u, v) lie inside ``shape``."""
    asp = shape["aspect"]
    if shape["kind"] == "ellipse":
        return u * u + (v / asp) ** 2 <= 1
    if shape["kind"] == "rectangle":
        return (np.abs(u) <= 1) & (np.abs(v) <= asp)
    inside = np.zeros(u.shape, bool)            # crossing-number test against every edge
    verts = shape["verts"] * [1, asp]
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, 0)):
        crosses = (y0 > v) != (y1 > v)
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0 if y1 != y0 else 1e-12)
        inside ^= crosses & (u < x_at)
    return inside


# ---- one video ----------------------------------------------------------------------------------
def _fold(x, lo, hi):
    """Reflect x into [lo, hi] (a path bouncing off the walls)."""
    span = hi - lo
    y = np.mod(x - lo, 2 * span)
    return lo + span - np.abs(y - span)


def _salient(rng, obj_id: int, t, height: int, width: int) -> dict:
    """A moving object: the radius (at least 13-18 % of the frame's smaller side) goes x1.5-2.2
    up (or down) over 7-10 frames and back, the centre travels 1.5-3 px a frame (at 96 px, 3-10
    times the pan) with a wobble, bouncing off the frame's edges (it may leave the frame partly)."""
    px = min(height, width) / 96                        # pixels per unit of a 96 px frame
    r_min, factor = rng.uniform(0.13, 0.18) * min(height, width), rng.uniform(1.5, 2.2)
    half_period = rng.uniform(7, 10)
    tri = 1 - np.abs(np.mod(t / half_period, 2) - 1)    # 0 -> 1 -> 0 over 2 half periods
    if rng.random() < 0.5:
        tri = 1 - tri                                   # shrink first
    v, heading = rng.uniform(1.5, 3.0) * px, rng.uniform(0, 2 * np.pi)
    wobble = rng.uniform(0, 2 * px, 2)[:, None] * np.sin(rng.uniform(0.2, 0.6, 2)[:, None] * t
                                                          + rng.uniform(0, 6.3, 2)[:, None])
    cx = _fold(rng.uniform(0.2, 0.8) * width + v * np.cos(heading) * t + wobble[0],
               0.05 * width, 0.95 * width)
    cy = _fold(rng.uniform(0.2, 0.8) * height + v * np.sin(heading) * t + wobble[1],
               0.05 * height, 0.95 * height)
    return dict(id=obj_id, shape=_random_shape(rng), texture=_random_texture(rng, 0.6),
                cx=cx, cy=cy, r=r_min * factor ** tri,
                angle=rng.uniform(0, 2 * np.pi) + rng.uniform(-0.05, 0.05) * t)


def _plan_video(rng, frames: int, height: int, width: int) -> dict:
    """The camera pan (2, frames) (world = screen + pan), the background texture, and the layers
    back to front, each with its pose per frame in screen pixels: cx, cy, r (radius), angle
    (frames,) and its id (0 for the static, non-salient ones)."""
    t = np.arange(frames, dtype=np.float64)
    speed = rng.uniform(0.15, 0.5) * min(height, width) / 96
    direction = rng.uniform(0, 2 * np.pi)
    pan = rng.uniform(0, 200, 2)[:, None] + speed * np.array(
        [[np.cos(direction)], [np.sin(direction)]]) * t
    background = _random_texture(rng, 0.2 * min(height, width))
    objects = [_salient(rng, i, t, height, width) for i in range(1, int(rng.integers(1, 4)) + 1)]
    rng.shuffle(objects)                                # depth order among the salient objects

    def static(shape, texture, x, y, r, angle):         # fixed in the world: moves with the pan
        return dict(id=0, shape=shape, texture=texture, cx=x - pan[0], cy=y - pan[1],
                    r=np.full(frames, r), angle=np.full(frames, angle))

    behind, front = [], []
    for _ in range(int(rng.integers(1, 3))):            # look-alikes: a salient object's copy
        src = objects[int(rng.integers(len(objects)))]
        behind.append(static(src["shape"], src["texture"],
                             rng.uniform(0.1, 0.9) * width + pan[0, 0],
                             rng.uniform(0.1, 0.9) * height + pan[1, 0],
                             rng.uniform(0.5, 0.8) * src["r"].min(), rng.uniform(0, 6.3)))
    if rng.random() < 0.4:                              # an occluder on a salient object's path
        src, k = objects[int(rng.integers(len(objects)))], int(rng.integers(2, max(3, frames - 2)))
        k = min(k, frames - 1)
        x, y = src["cx"][k] + pan[0, k], src["cy"][k] + pan[1, k]
        if rng.random() < 0.5:                          # a pole across the frame
            pole = dict(kind="rectangle", aspect=rng.uniform(0.04, 0.08), verts=None)
            front.append(static(pole, _random_texture(rng, 0.6), x, y, 0.7 * height,
                                np.pi / 2 + rng.uniform(-0.4, 0.4)))
        else:                                           # a look-alike in front
            x += rng.uniform(-0.5, 0.5) * src["r"][k]
            front.append(static(src["shape"], src["texture"], x, y,
                                rng.uniform(0.4, 0.6) * src["r"][k], rng.uniform(0, 6.3)))
    return dict(pan=pan, background=background, layers=behind + objects + front)


def _render(plan: dict, k: int, height: int, width: int, rng):
    """Frame k: image uint8 (H, W, 3) and instance ids uint8 (H, W)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    image = _texture_rgb(plan["background"], xs + plan["pan"][0, k], ys + plan["pan"][1, k])
    ids = np.zeros((height, width), np.uint8)
    for layer in plan["layers"]:
        c, s = np.cos(layer["angle"][k]), np.sin(layer["angle"][k])
        dx, dy = xs - layer["cx"][k], ys - layer["cy"][k]
        u, v = (c * dx + s * dy) / layer["r"][k], (-s * dx + c * dy) / layer["r"][k]
        inside = _inside(layer["shape"], u, v)
        image[inside] = _texture_rgb(layer["texture"], u[inside], v[inside])
        ids[inside] = layer["id"]
    image = image + rng.normal(0, 2 / 255, image.shape)    # sensor noise
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), ids


def _write_video(out: Path, name: str, seed: int, split: str, index: int, frames: int,
                 height: int, width: int):
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    plan = _plan_video(rng, frames, height, width)
    image_dir = out / "JPEGImages" / "480p" / name
    mask_dir = out / "Annotations" / "480p" / name
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for k in range(frames):
        image, ids = _render(plan, k, height, width, rng)
        Image.fromarray(image).save(image_dir / f"{k:05d}.jpg", quality=90)
        mask = Image.fromarray(ids)
        mask.putpalette(PALETTE)                         # "L" -> "P"
        mask.save(mask_dir / f"{k:05d}.png")


def _params(**params) -> dict:
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown synthetic data parameters: {sorted(unknown)}")
    return {"format": FORMAT, **DEFAULTS, **params}


def _write(tmp: Path, root: Path, n_train, n_val, frames, height, width, seed):
    """Every video and the image-set lists into ``tmp``, one process a video."""
    names = {s: [f"{s}_{i:03d}" for i in range(n)] for s, n in (("train", n_train),
                                                                  ("val", n_val))}
    jobs = [(split, i, name) for split, split_names in names.items()
            for i, name in enumerate(split_names)]
    workers = max(1, min(len(jobs), os.cpu_count() or 1, 16))
    with progress(total=len(jobs), desc=f"synthetic {root}", unit="video") as bar, \
            ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_write_video, tmp, name, seed, split, i, frames, height, width)
                   for split, i, name in jobs]
        for future in futures:
            future.result()
            bar.update()
    for year in ("2016", "2017"):
        (tmp / "ImageSets" / year).mkdir(parents=True)
        for split, split_names in names.items():
            text = "".join(n + "\n" for n in split_names)
            (tmp / "ImageSets" / year / f"{split}.txt").write_text(text)


def generate(root, n_train=DEFAULTS["n_train"], n_val=DEFAULTS["n_val"],
             frames=DEFAULTS["frames"], height=DEFAULTS["height"], width=DEFAULTS["width"],
             seed=DEFAULTS["seed"]) -> Path:
    """Write the dataset to ``root`` (built in ``root.tmp-<pid>``, then renamed; an existing
    ``root`` is replaced only if it holds a ``synthetic.json``). Returns ``root`` as a Path."""
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not (root / "synthetic.json").exists():
        raise BadInput(f"{root} exists and is not a synthetic dataset (no synthetic.json): move "
                       f"it, or write the set elsewhere")
    params = _params(n_train=n_train, n_val=n_val, frames=frames, height=height, width=width,
                     seed=seed)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, root, n_train, n_val, frames, height, width, seed)
    except BaseException:                       # Ctrl-C or an error: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "synthetic.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n")
    old = root.with_name(f"{root.name}.old-{os.getpid()}")
    if root.exists():
        root.rename(old)
    tmp.rename(root)
    shutil.rmtree(old, ignore_errors=True)
    return root


def default_root(**params) -> Path:
    """Where ``--data synthetic`` keeps the set for ``params``: ``data/synthetic`` at the default
    frame size, ``data/synthetic-<height>x<width>`` at another."""
    p = _params(**params)
    if (p["height"], p["width"]) == (DEFAULTS["height"], DEFAULTS["width"]):
        return Path("data/synthetic")
    return Path(f"data/synthetic-{p['height']}x{p['width']}")


def describe(params: dict) -> str:
    """'48 training and 8 validation videos of 20 frames at 64x96'."""
    return (f"{params['n_train']} training and {params['n_val']} validation videos of "
            f"{params['frames']} frames at {params['height']}x{params['width']}")


def ensure(root=None, **params) -> Path:
    """``root`` (default: :func:`default_root`) holding a synthetic set, generated with
    ``params`` (keyword arguments of :func:`generate`) when it holds none.

    A set already there is used as it is, also when it was written with other parameters (by
    ``python -m d2conv.data.synthetic --out ROOT ...``): a line says what differs. A set written
    by an older version of the generator is rewritten with its own parameters, and a line says
    so. Safe to call from several processes at once (DDP ranks): they take turns on the lock
    file ``<root>.lock``."""
    wanted = _params(**params)
    root = Path(root) if root is not None else default_root(**params)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                # released when the file is closed
        try:
            found = json.loads((root / "synthetic.json").read_text())
        except (OSError, ValueError):
            found = None
        if found is not None and found.get("format") == FORMAT:
            if found != wanted:
                print(f"synthetic data: using {root} as it was written ({describe(found)}, "
                      f"seed {found['seed']}) rather than the {describe(wanted)} asked for; "
                      f"delete the folder to regenerate it")
            return root
        if found is not None:
            wanted = {**wanted, **{k: found[k] for k in DEFAULTS if k in found}}
            print(f"synthetic data: {root} was written by an older generator; rewriting it with "
                  f"its parameters ({describe(wanted)})")
        start = time.perf_counter()
        print(f"synthetic data: writing {describe(wanted)} to {root}", flush=True)
        generate(root, **{k: wanted[k] for k in DEFAULTS})
        print(f"synthetic data: done in {time.perf_counter() - start:.0f} s", flush=True)
        return root


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m d2conv.data.synthetic",
                                description="Write the procedural video dataset (DAVIS layout).")
    p.add_argument("--out", default="data/synthetic", help="output root (default: %(default)s)")
    p.add_argument("--train", type=int, default=DEFAULTS["n_train"], help="training videos")
    p.add_argument("--val", type=int, default=DEFAULTS["n_val"], help="validation videos")
    p.add_argument("--frames", type=int, default=DEFAULTS["frames"], help="frames per video")
    p.add_argument("--height", type=int, default=DEFAULTS["height"], help="frame height")
    p.add_argument("--width", type=int, default=DEFAULTS["width"], help="frame width")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed")
    a = p.parse_args(argv)
    start = time.perf_counter()
    try:
        root = generate(a.out, n_train=a.train, n_val=a.val, frames=a.frames, height=a.height,
                        width=a.width, seed=a.seed)
    except InputError as error:
        p.exit(2, f"error: {error}\n")
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"wrote {a.train + a.val} videos x {a.frames} frames ({a.height}x{a.width}) to {root} "
          f"in {time.perf_counter() - start:.1f} s, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
