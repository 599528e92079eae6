"""Multi-GPU check of train.py on one host (issue 7): DDP on 2 GPUs against 1 GPU at the same
global batch, and resume from the 2-GPU checkpoint on 2 GPUs and on 1.

    python bench/ddp_check.py [--steps 50] [--more 10] [--decoder-conv d2conv-xyz]

Runs, each a fresh process (paper preset, synthetic set, per-step log lines):
  2gpu     torchrun --nproc_per_node 2 train.py --batch-size 2 --max-steps STEPS
  1gpu     train.py --batch-size 4 --max-steps STEPS                 (the same global batch)
  2gpu+    torchrun ... --resume --max-steps STEPS+MORE              (from 2gpu's last.pt)
  2to1+    train.py --resume --batch-size 4 --max-steps STEPS+MORE   (from a copy of it)
  1gpu-again   1gpu once more: how far two identical runs drift apart (bf16, atomics)
  1gpu-b2  train.py --batch-size 2: the clips/s of one GPU at the per-GPU batch of 2gpu
Prints the loss agreement per step, clips/s (median after the first 10 steps, data loading
included), peak memory, and what each run directory holds; writes
bench/results/<gpu>-ddp.json.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(name, command, env, log):
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - started
    log.write(f"==== {name}: {' '.join(command)}\n{result.stdout}\n{result.stderr[-6000:]}\n")
    log.flush()
    if result.returncode != 0:
        sys.exit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, result.stdout


def entries(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {e["step"]: e["loss"] for e in entries(run_dir) if "loss" in e}


def rate(run_dir, skip=10):
    rates = [e["clips_per_s"] for e in entries(run_dir) if "clips_per_s" in e]
    return statistics.median(rates[skip:]) if len(rates) > skip else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--more", type=int, default=10)
    p.add_argument("--decoder-conv", default="d2conv-xyz")
    p.add_argument("--preset", default="paper", help="tiny: a CPU dry run (gloo)")
    p.add_argument("--out", default="runs/ddp-check")
    a = p.parse_args()
    if torch.cuda.device_count() < 2 and a.preset == "paper":
        sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    out = REPO / a.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    one_gpu = dict(env, CUDA_VISIBLE_DEVICES="0")
    train = [str(REPO / "train.py"), "--preset", a.preset, "--data", "synthetic",
             "--decoder-conv", a.decoder_conv, "--log-every", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    total = a.steps + a.more
    log = open(out / "stdout.txt", "w")
    subprocess.run([sys.executable, "-c", "from d2conv.data.synthetic import ensure; ensure()"],
                   cwd=REPO, env=env, check=True)

    walls = {}
    walls["2gpu"], _ = run("2gpu", torchrun + train + [
        "--batch-size", "2", "--max-steps", str(a.steps), "--run-dir", str(out / "2gpu")], env, log)
    shutil.copytree(out / "2gpu", out / "2to1")
    walls["1gpu"], _ = run("1gpu", [sys.executable] + train + [
        "--batch-size", "4", "--max-steps", str(a.steps), "--run-dir", str(out / "1gpu")],
        one_gpu, log)
    walls["2gpu+"], _ = run("2gpu+", torchrun + [str(REPO / "train.py"), "--resume", "--run-dir",
                                                str(out / "2gpu"), "--max-steps", str(total)],
                            env, log)
    walls["2to1+"], said = run("2to1+", [sys.executable, str(REPO / "train.py"), "--resume",
                                         "--run-dir", str(out / "2to1"), "--batch-size", "4",
                                         "--max-steps", str(total)], one_gpu, log)

    for name, batch in (("1gpu-again", "4"), ("1gpu-b2", "2")):
        walls[name], _ = run(name, [sys.executable] + train + [
            "--batch-size", batch, "--max-steps", str(a.steps), "--run-dir", str(out / name)],
            one_gpu, log)

    log.close()
    two, one = losses(out / "2gpu"), losses(out / "1gpu")     # 2gpu: resumed steps included
    again, moved = losses(out / "1gpu-again"), losses(out / "2to1")
    steps = sorted(set(two) & set(one))             # the first STEPS
    diffs = [abs(two[s] - one[s]) for s in steps]
    noise = [abs(again[s] - one[s]) for s in steps]
    resumed = list(range(a.steps + 1, total + 1))
    resumed_diffs = [abs(two[s] - moved[s]) for s in resumed if s in moved]
    checkpoints = {name: sorted(f.name for f in (out / name).iterdir())
                   for name in ("2gpu", "1gpu", "2to1")}
    log_lines = {name: sum(1 for e in entries(out / name) if "loss" in e)
                 for name in ("2gpu", "1gpu", "2to1")}
    peaks = {name: max(e.get("peak_mib", 0) for e in entries(out / name))
             for name in ("2gpu", "1gpu")}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record = dict(gpu=gpu.replace(" ", "_"), torch=torch.__version__,
                  steps=a.steps, more=a.more, decoder_conv=a.decoder_conv, global_batch=4,
                  loss_2gpu=[two[s] for s in steps], loss_1gpu=[one[s] for s in steps],
                  max_abs_loss_diff=max(diffs), mean_abs_loss_diff=statistics.mean(diffs),
                  first_step_loss_diff=diffs[0], loss_1gpu_again=[again[s] for s in steps],
                  max_abs_noise_diff=max(noise), mean_abs_noise_diff=statistics.mean(noise),
                  resumed_loss_2gpu=[two.get(s) for s in resumed],
                  resumed_loss_2to1=[moved.get(s) for s in resumed],
                  max_abs_resumed_diff=max(resumed_diffs) if resumed_diffs else None,
                  clips_per_s_2gpu=rate(out / "2gpu"), clips_per_s_1gpu=rate(out / "1gpu"),
                  clips_per_s_1gpu_batch2=rate(out / "1gpu-b2"),
                  peak_mib=peaks, wall_s=walls, files=checkpoints, loss_log_lines=log_lines,
                  resume_message=[line for line in said.splitlines() if "resume" in line])
    path = REPO / "bench" / "results" / f"{record['gpu']}-ddp.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'step':>5} {'2 GPUs':>9} {'1 GPU':>9} {'|diff|':>8} {'1 GPU again':>12} {'|diff|':>8}")
    for s in sorted({*steps[:3], *steps[9::10], steps[-1]}):
        print(f"{s:>5} {two[s]:>9.5f} {one[s]:>9.5f} {abs(two[s] - one[s]):>8.5f} "
              f"{again[s]:>12.5f} {abs(again[s] - one[s]):>8.5f}")
    print(f"|2 GPUs - 1 GPU| over {len(steps)} steps: max {max(diffs):.5f}, mean "
          f"{statistics.mean(diffs):.5f}; |1 GPU again - 1 GPU|: max {max(noise):.5f}, mean "
          f"{statistics.mean(noise):.5f}")
    print(f"resumed steps {resumed[0]}-{resumed[-1]}: 2 GPUs {record['resumed_loss_2gpu']}")
    print(f"                   2->1 GPU {record['resumed_loss_2to1']}")
    print(f"clips/s 2 GPUs {record['clips_per_s_2gpu']:.2f}, 1 GPU {record['clips_per_s_1gpu']:.2f}"
          f" (batch 2: {record['clips_per_s_1gpu_batch2']:.2f});"
          f" peak MiB {peaks}; wall {walls}")
    print(f"files {checkpoints}; loss lines {log_lines}; {record['resume_message']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
