"""Segment videos with a trained model and score them with the DAVIS-2016 protocol (docs/davis.md).

    python evaluate.py                                   # newest run's best.pt, on its data
    python evaluate.py --checkpoint runs/X/best.pt --data /data/DAVIS --out results/X
    python evaluate.py --davis-path /data/DAVIS --results-path results/X --set val

Model mode writes <out>/<sequence>/<frame>.png (indexed, 0/1) for every frame, then scores them;
evaluation-only mode scores an existing results folder. Both score against the DAVIS-2016 ground
truth (Annotations/480p binarised, either DAVIS layout), write global_results-<set>.csv and
per-sequence_results-<set>.csv into the results folder (refusing to overwrite them without
--force) and print the tables. Model mode with the defaults (clips every 5 frames) follows the
same protocol as train.py's validation, so both print the same J&F for one checkpoint.

Exit status: 0 done, 2 bad input (one line names the path or option and what is wrong).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import kernels
from d2conv.checkpoints import load_checkpoint, load_weights
from d2conv.config import build_model, from_dict
from d2conv.data import check_files, dataset_root, load_mask
from d2conv.errors import (ArgumentParser, BadInput, InputError, MissingInput, exit_status,
                           int_range)
from d2conv.evaluation import (evaluate_results, format_tables, protocol_sequences, run_model,
                               summary)
from d2conv.graphs import GraphedInference
from d2conv.metrics import mae, max_f_measure, write_csvs
from d2conv.model import to_device


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model mode")
    model.add_argument("--checkpoint", help="a trainer checkpoint (best.pt / last.pt); default: "
                                            "the newest runs/*/best.pt")
    model.add_argument("--data", default=None, help="'synthetic' (default) or a DAVIS root")
    model.add_argument("--out", help="results folder (default: <run>/results_<gap>)")
    model.add_argument("--temporal-gap", type=int_range(1), default=5,
                       help="a clip (of the run's clip_len frames) starts every this many "
                            "frames, 1 to clip_len (default 5)")
    model.add_argument("--dense", action="store_true", help="a clip at every frame (gap 1)")
    model.add_argument("--clips-per-batch", type=int_range(1), default=4,
                       help="clips per forward pass")
    model.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="run the model eagerly (by default, on a GPU, each clip batch shape "
                            "is captured as a CUDA graph at its second batch and replayed)")
    model.add_argument("--save-logits", action="store_true", help="also <out>/logits/<seq>.npy")
    model.add_argument("--save-probabilities", action="store_true",
                       help="also <out>/probabilities/<seq>/<frame>.png (for --saliency)")
    model.add_argument("--save-dilation", action="store_true",
                       help="also colour-mapped D²Conv size maps per layer and frame")
    scoring = p.add_argument_group("evaluation")
    scoring.add_argument("--davis-path", help="DAVIS root (evaluation-only mode)")
    scoring.add_argument("--results-path", help="results folder to score (evaluation-only mode)")
    scoring.add_argument("--set", default="val",
                         help="image set: ImageSets/2016/<set>.txt, or ImageSets/480p/<set>.txt "
                              "in the DAVIS-2016 release (default val)")
    scoring.add_argument("--task", default="unsupervised",
                         choices=["unsupervised", "semi-supervised"],
                         help="unsupervised scores every frame; semi-supervised drops the first "
                              "and last")
    scoring.add_argument("--saliency", action="store_true",
                         help="also MAE and max F-measure (beta^2 = 0.3) from the saved "
                              "probabilities (FBMS / ViSal style)")
    scoring.add_argument("--force", action="store_true", help="overwrite existing result CSVs")
    return p.parse_args(argv)


def newest_checkpoint(runs=Path("runs")):
    found = sorted(runs.glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise MissingInput(f"no checkpoint found under {runs}/*/best.pt: train first "
                           f"(python train.py) or pass --checkpoint")
    return found[-1]


def load_model(path, device):
    """(model in eval mode on ``device``, the checkpoint's TrainConfig, the checkpoint)."""
    state = load_checkpoint(path)
    try:
        cfg = from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise BadInput(f"{path}: its config is not this version's: {error}") from None
    model = load_weights(build_model(cfg), state["model"], path)
    return to_device(model, device).eval(), cfg, state


def saliency_scores(davis_root, results, split):
    """MAE and max F-measure of the saved probabilities over every annotated frame."""
    probs, gts = [], []
    for seq in protocol_sequences(davis_root, split):
        for mask in (m for m in seq.masks if m is not None):
            path = Path(results) / "probabilities" / seq.name / f"{Path(mask).stem}.png"
            if not path.exists():
                raise MissingInput(f"--saliency: missing {path} (run model mode with "
                                   f"--save-probabilities)")
            with Image.open(path) as image:
                probs.append(np.asarray(image, dtype=np.float32) / 255)
            gts.append(load_mask(mask))
    return {"MAE": mae(probs, gts), "max-F": max_f_measure(probs, gts)}


def run(args):
    if args.results_path or args.davis_path:                     # evaluation-only mode
        if not (args.results_path and args.davis_path):
            raise InputError("evaluation-only mode needs both --davis-path and --results-path")
        davis_root, results, checkpoint = Path(args.davis_path), Path(args.results_path), None
        if not davis_root.is_dir():
            raise MissingInput(f"--davis-path: no such folder {davis_root}")
    else:                                                        # model mode
        checkpoint = Path(args.checkpoint) if args.checkpoint else newest_checkpoint()
        gap = 1 if args.dense else args.temporal_gap
        results = Path(args.out) if args.out else checkpoint.parent / f"results_{gap}"
    csvs = [results / f"global_results-{args.set}.csv",
            results / f"per-sequence_results-{args.set}.csv"]
    if any(p.exists() for p in csvs) and not args.force:
        raise InputError(f"{csvs[0]} or its per-sequence twin exists: pass --force to recompute")

    if checkpoint is not None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, cfg, state = load_model(checkpoint, device)
        if gap > cfg.clip_len:                # frames between clips would get no prediction
            raise InputError(f"--temporal-gap: must be in [1, {cfg.clip_len}] (the run's clip "
                             f"length), got {gap}")
        if not cfg.autotune:                  # as the run trained: default kernel configs
            kernels.set_autotune(False)
        davis_root = dataset_root(args.data or cfg.data, cfg.synthetic)
        sequences = protocol_sequences(davis_root, args.set)
        check_files(sequences)
        amp = torch.bfloat16 if device.type == "cuda" and cfg.amp else None
        trained = state.get("scores")
        if trained:
            trained = (f", validated in training at step {trained['step']}: IoU "
                       f"{trained['iou']:.3f}, J&F {trained['J&F']:.3f}")
        print(f"{checkpoint}: {cfg.decoder_conv}{trained or ''}; {len(sequences)} "
              f"{args.set} videos of {davis_root}, clips every {gap} frames -> {results}")
        if device.type == "cuda" and args.cuda_graphs:
            model = GraphedInference(model)
        timing = run_model(model, sequences, results, clip_len=cfg.clip_len, gap=gap,
                           clips_per_batch=args.clips_per_batch, amp_dtype=amp,
                           size=tuple(cfg.size) or None,
                           save_logits=args.save_logits,
                           save_probabilities=args.save_probabilities or args.saliency,
                           save_dilation=args.save_dilation)
        peak = f", peak GPU memory {timing['peak_mib']:.0f} MiB" if timing["peak_mib"] else ""
        print(f"{timing['frames']} frames: {timing['frames'] / timing['model_s']:.1f} fps "
              f"(model), {timing['frames'] / timing['total_s']:.1f} fps (end to end){peak}")

    global_row, rows, per_sequence = evaluate_results(davis_root, results, args.set, args.task)
    write_csvs(results, args.set, global_row, rows)
    print(f"--------------- Global results for {args.set} ({args.task}) ---------------")
    print(format_tables(global_row, rows))
    print(f"\nforeground IoU (J over every frame, as train.py's validation prints it): "
          f"{summary(per_sequence)['iou']:.3f}")
    if args.saliency:
        scores = saliency_scores(davis_root, results, args.set)
        print(f"saliency: MAE {scores['MAE']:.4f}, max F-measure {scores['max-F']:.4f}")
    print(f"results: {csvs[0]}")
    return 0


def main(argv=None):
    return exit_status(lambda: run(parse_args(argv)))   # a bad option: one line, status 2


if __name__ == "__main__":
    sys.exit(main())
