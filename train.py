"""Train the paper's model (docs/training.md), or a small one from scratch.

    python train.py                         # CPU: tiny preset; GPU: small preset (synthetic videos)
    python train.py --preset paper --data /data/DAVIS --backbone-weights weights/ir_csn_152.pt
    python train.py --max-steps 3 --run-dir runs/demo && python train.py --run-dir runs/demo --resume --max-steps 5
    torchrun --nproc_per_node 2 train.py --preset paper ...   # DDP; the global batch is 2 x batch-size

Exit status: 0 done, 2 bad input (a path, a file, an option: one line says which), 3 non-finite
loss (the last good checkpoint is kept), 130 interrupted by Ctrl-C, 143 by SIGTERM (both after
saving last.pt).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

from d2conv.checkpoints import load_checkpoint
from d2conv.config import CHOICES, DESCRIPTIONS, FIELDS, PRESETS, make_config
from d2conv.errors import (ArgumentParser, BadInput, InputError, MissingInput, Terminated,
                           exit_status, int_range, on_sigterm, positive_float)
from d2conv.model import DECODER_CONVS
from d2conv.trainer import NonFiniteLoss, Trainer, minutes, scores_line

PAPER = ("python train.py --preset paper --data /path/to/DAVIS "
         "--backbone-weights weights/ir_csn_152.pt")
RANDOM_WEIGHTS = """\
--preset paper without --backbone-weights is the paper's FINE-TUNING recipe (lr 1e-5)
started from RANDOM weights: it learns almost nothing. Convert the VMZ ir-CSN-152
weights (README, 'The model') and pass --backbone-weights, or leave out --preset for
a from-scratch preset."""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model and recipe (default: tiny on the CPU; on a GPU small, or paper "
                        "when --backbone-weights is given)")
    p.add_argument("--data", help="'synthetic' (generated under ./data on first use, the default) "
                                  "or a DAVIS root (DAVIS-2017 with ImageSets/2016 and 2017, or "
                                  "the DAVIS-2016 release with ImageSets/480p)")
    p.add_argument("--run-dir", help="where checkpoints (last.pt, best.pt) and log.jsonl go "
                                     "(default: runs/<preset>-<decoder>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last.pt (its config, with the "
                        "options given here overriding it)")
    p.add_argument("--max-steps", type=int_range(1),
                   help="stop after this many optimizer steps in total")
    p.add_argument("--epochs", type=int_range(1), help="number of epochs")
    p.add_argument("--backbone-weights", help="converted VMZ ir-CSN weights "
                                              "(python -m d2conv.weights convert SRC DST)")
    p.add_argument("--decoder-conv", choices=DECODER_CONVS,
                   help="decoder convolutions: dense (3DC-Seg), aspp, dcn, dcnv2, d2conv-<mode> "
                        "(default d2conv-xyz, the paper's model)")
    p.add_argument("--batch-size", type=int_range(1),
                   help="clips per process (global batch = this x GPUs)")
    p.add_argument("--lr", type=positive_float,
                   help="learning rate (paper: 1e-5 with a pretrained backbone)")
    p.add_argument("--loss", choices=CHOICES["loss"], help="training loss")
    p.add_argument("--optimizer", choices=CHOICES["optimizer"], help="optimizer")
    p.add_argument("--scheduler", choices=CHOICES["scheduler"], help="learning-rate schedule")
    p.add_argument("--augment", dest="augment", action="store_true", default=None,
                   help="flips and scale jitter (off in the paper preset, as in the original)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no flips or scale jitter")
    p.add_argument("--no-replacement", dest="replacement", action="store_false", default=None,
                   help="draw a clip's frames without replacement (the original draws 8 with "
                        "replacement from the 8 around the centre frame)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run the training forward and backward eagerly (by default, on one GPU, "
                        "they replay CUDA graphs captured at the first step)")
    p.add_argument("--workers", type=int_range(0), help="DataLoader worker processes")
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), help="random seed")
    p.add_argument("--log-every", type=int_range(1),
                   help="optimizer steps between log lines (log.jsonl, TensorBoard, progress)")
    return p.parse_args(argv)


def default_preset(backbone_weights):
    """tiny on the CPU; on a GPU the paper's recipe given backbone weights, else small."""
    if not torch.cuda.is_available():
        return "tiny", "no GPU"
    if backbone_weights:
        return "paper", "a GPU and --backbone-weights"
    return "small", "a GPU and no --backbone-weights"


def config(args):
    """The run's TrainConfig: a new one from the preset, or the resumed run's."""
    overrides = dict(data=args.data, max_steps=args.max_steps, epochs=args.epochs,
                     backbone_weights=args.backbone_weights, decoder_conv=args.decoder_conv,
                     batch_size=args.batch_size, lr=args.lr, loss=args.loss,
                     optimizer=args.optimizer, scheduler=args.scheduler, augment=args.augment,
                     replacement=args.replacement, cuda_graphs=args.cuda_graphs,
                     workers=args.workers, seed=args.seed,
                     log_every=args.log_every)
    if args.backbone_weights and not Path(args.backbone_weights).is_file():
        raise MissingInput(f"--backbone-weights: no such file {args.backbone_weights}")
    if args.resume:
        if not args.run_dir:
            raise InputError("--resume needs --run-dir")
        last = Path(args.run_dir) / "last.pt"
        saved = load_checkpoint(last)["config"]
        preset = args.preset or saved.pop("preset", None)
        saved.pop("preset", None)
        saved["run_dir"] = args.run_dir         # the folder resumed from, also when moved or copied
        saved = {k: v for k, v in saved.items() if k in FIELDS}    # an older version's dropped
        try:
            return make_config(preset, **{**saved, **{k: v for k, v in overrides.items()
                                                      if v is not None}}), None
        except (TypeError, ValueError) as error:
            raise BadInput(f"{last}: its config is not this version's: {error}") from None
    preset, why = ((args.preset, None) if args.preset else default_preset(args.backbone_weights))
    decoder = args.decoder_conv or "d2conv-xyz"
    run_dir = args.run_dir or f"runs/{preset}-{decoder}-{time.strftime('%Y%m%d-%H%M%S')}"
    return make_config(preset, run_dir=run_dir, **overrides), why


def announce(cfg, why):
    """What this run trains, on what, for how long; a warning for the paper's recipe without
    pretrained weights."""
    chosen = f" (the default with {why})" if why else ""
    what, took = DESCRIPTIONS[cfg.preset]
    if cfg.preset == "paper" and cfg.data == "synthetic":
        what = ("ON THE SYNTHETIC VIDEOS, not DAVIS: no --data was given (the paper's recipe "
                "trains ir-CSN-152 on DAVIS-2017 train: --data /path/to/DAVIS)")
    print(f"preset {cfg.preset}{chosen}: {what}, decoder {cfg.decoder_conv}, {cfg.epochs} epochs"
          f"{f' (at most {cfg.max_steps} steps)' if cfg.max_steps else ''} -> {cfg.run_dir}")
    print(f"how long: the preset's {PRESETS[cfg.preset]['epochs']} epochs took {took}",
          flush=True)
    if cfg.preset != "paper":
        print(f"the paper's recipe: {PAPER}")
    elif not cfg.backbone_weights:
        lines = ["=" * 70, *RANDOM_WEIGHTS.splitlines(), "=" * 70]
        print("\n".join(f"WARNING: {line}" for line in lines), file=sys.stderr, flush=True)


def run(args):
    cfg, why = config(args)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        announce(cfg, why)
    trainer = Trainer(cfg)
    try:
        with on_sigterm():                  # SIGTERM saves last.pt as Ctrl-C does
            if args.resume:
                trainer.resume()
            summary = trainer.fit()
    except NonFiniteLoss as error:
        print(f"stopped: {error}; the last good checkpoint is kept in {cfg.run_dir}", file=sys.stderr)
        return 3
    except Terminated:
        print(f"\nterminated (SIGTERM): saved {cfg.run_dir}/last.pt; --resume continues it",
              file=sys.stderr)
        return Terminated.status
    except KeyboardInterrupt:
        print(f"\ninterrupted: saved {cfg.run_dir}/last.pt", file=sys.stderr)
        return 130
    finally:
        trainer.close()
    if trainer.main:
        last, best = summary["last"], summary["best"]
        print(f"done in {minutes(summary['seconds'])} ({summary['step']} steps): last "
              f"validation {scores_line(last)}; best J&F {best['J&F']:.3f} (IoU "
              f"{best['iou']:.3f}) at step {best['step']}")
        checkpoint = Path(summary["checkpoint"])
        if checkpoint.parent.parent == Path("runs"):    # evaluate.py's default: the newest one
            print(f"next: python evaluate.py  (evaluates {checkpoint}, this run's best "
                  f"validation J&F; last.pt beside it holds the last step)")
        else:
            print(f"next: python evaluate.py --checkpoint {checkpoint}  (this run's best "
                  f"validation J&F; last.pt beside it holds the last step)")
    return 0


def main(argv=None):
    return exit_status(lambda: run(parse_args(argv)))   # a bad option: one line, status 2


if __name__ == "__main__":
    sys.exit(main())
