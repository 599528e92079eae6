"""Train variants of the tiny preset side by side and compare their validation IoU per epoch.

What the CPU default (`python train.py` on two cores, about 960 steps in 10 minutes) can reach
is a question of what the tiny preset learns per step; on a GPU machine many variants train at
once (one process each), so this answers it in minutes. Runs in fp32 (no autocast) like the CPU.

    PYTHONPATH=. python bench/sweep_tiny.py VARIANTS.json --jobs 8 --out sweep.json

VARIANTS.json maps a name to TrainConfig overrides of the tiny preset, e.g.
``{"base": {}, "lr1e-3": {"lr": 1e-3}, "long": {"epochs": 32, "val_every": 4}}``, plus three
keys that build a wider or deeper tiny backbone: ``widths`` (4 bottleneck widths, default
8, 16, 32, 64), ``layers`` (blocks per stage, default 1, 1, 1, 1) and ``stem`` (default 8).
Prints one line per finished variant and a table sorted by the final IoU; ``--out`` gets the
records (name, overrides, seconds, IoU per validation, J&F).
"""
import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BACKBONE_KEYS = {"widths": "widths", "layers": "layers", "stem": "stem_channels"}  # ir_csn_tiny's


def train_one(name, overrides, run_root):
    """Train one variant in this process; returns its record."""
    import torch

    from d2conv import model
    from d2conv.backbones import ir_csn_tiny
    from d2conv.trainer import Trainer, make_config

    overrides = dict(overrides)
    shape = {k: overrides.pop(k) for k in BACKBONE_KEYS if k in overrides}
    if shape:               # a tiny backbone of another size, registered under its own name
        size = {BACKBONE_KEYS[k]: v for k, v in shape.items()}
        model.BACKBONES[f"sweep_{name}"] = functools.partial(ir_csn_tiny, **size)
        overrides["backbone"] = f"sweep_{name}"
    overrides.setdefault("amp", False)
    cfg = make_config("tiny", run_dir=os.path.join(run_root, name), **overrides)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)      # a fresh log, not appended to
    start = time.time()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    trainer.close()
    with open(os.path.join(cfg.run_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return dict(name=name, overrides={**overrides, **shape}, seconds=round(time.time() - start),
                steps=summary["step"], iou=[round(r["val_iou"], 3) for r in rows if "val_iou" in r],
                jf=round(summary["last"]["J&F"], 3), device=str(trainer.device),
                torch=torch.__version__)


def run_in_subprocess(name, variants, args):
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run([sys.executable, __file__, args.variants, "--one", name,
                           "--run-root", args.run_root], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return dict(name=name, overrides=variants[name], error=proc.stderr[-2000:])
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", help="JSON file: name -> tiny-preset overrides")
    parser.add_argument("--jobs", type=int, default=4, help="variants training at once")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per variant")
    parser.add_argument("--out", help="write the records here (JSON)")
    parser.add_argument("--run-root", default="runs/sweep", help="one run directory per variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)      # the worker: train this variant
    args = parser.parse_args()
    with open(args.variants) as f:
        variants = json.load(f)
    if args.one:
        import torch
        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(train_one(args.one, variants[args.one], args.run_root)))
        return

    from d2conv.data.synthetic import ensure
    ensure()            # once, before the variants look for it
    records = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for record in pool.map(lambda name: run_in_subprocess(name, variants, args), variants):
            records.append(record)
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(records, f, indent=1)
    done = sorted((r for r in records if "iou" in r), key=lambda r: -r["iou"][-1])
    print(f"\n{'variant':24} {'steps':>6} {'IoU':>6} {'J&F':>6} {'s':>5}  IoU per validation")
    for r in done:
        print(f"{r['name']:24} {r['steps']:6d} {r['iou'][-1]:6.3f} {r['jf']:6.3f} "
              f"{r['seconds']:5d}  {r['iou']}")
    for r in records:
        if "error" in r:
            print(f"{r['name']}: failed\n{r['error']}")


if __name__ == "__main__":
    main()
