"""Train the paper's model (SPEC §4).

    python train.py                         # CPU: tiny model, synthetic videos; GPU: paper model
    python train.py --preset paper --data /data/DAVIS --backbone-weights weights/ir_csn_152.pt
    python train.py --max-steps 3 --run-dir runs/demo && python train.py --run-dir runs/demo --resume --max-steps 5
    torchrun --nproc_per_node 2 train.py --preset paper     # DDP; the global batch is 2 x batch-size

Exit status: 0 done, 3 non-finite loss (the last good checkpoint is kept), 130 interrupted
(after saving last.pt).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from d2conv.model import DECODER_CONVS
from d2conv.trainer import NonFiniteLoss, Trainer, make_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "paper"],
                   help="model size and recipe (default: paper on a GPU, tiny on the CPU)")
    p.add_argument("--data", help="'synthetic' (generated under ./data on first use, the default) "
                                  "or a DAVIS root (JPEGImages/480p, Annotations_unsupervised/480p, ImageSets)")
    p.add_argument("--run-dir", help="where checkpoints (last.pt, best.pt) and log.jsonl go "
                                     "(default: runs/<preset>-<decoder>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last.pt (its config, with the "
                        "options given here overriding it)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in total")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--backbone-weights", help="converted VMZ ir-CSN weights "
                                              "(python -m d2conv.weights convert SRC DST)")
    p.add_argument("--decoder-conv", choices=DECODER_CONVS,
                   help="decoder convolutions: dense (3DC-Seg), aspp, dcn, dcnv2, d2conv-<mode> "
                        "(default d2conv-xyz, the paper's model)")
    p.add_argument("--batch-size", type=int, help="clips per process (global batch = this x GPUs)")
    p.add_argument("--lr", type=float, help="learning rate (paper: 1e-5 with a pretrained backbone)")
    p.add_argument("--loss", choices=["lovasz", "bce", "bce+lovasz"], help="training loss")
    p.add_argument("--optimizer", choices=["adam", "adamw"], help="optimizer")
    p.add_argument("--scheduler", choices=["step", "cosine"], help="learning-rate schedule")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="switch off flips, scale jitter and crops")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--log-every", type=int,
                   help="optimizer steps between log lines (log.jsonl, TensorBoard, progress bar)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = dict(data=args.data, max_steps=args.max_steps, epochs=args.epochs,
                     backbone_weights=args.backbone_weights, decoder_conv=args.decoder_conv,
                     batch_size=args.batch_size, lr=args.lr, loss=args.loss,
                     optimizer=args.optimizer, scheduler=args.scheduler, augment=args.augment,
                     workers=args.workers, seed=args.seed, log_every=args.log_every)
    if args.resume:
        if not args.run_dir:
            sys.exit("--resume needs --run-dir")
        last = Path(args.run_dir) / "last.pt"
        if not last.exists():
            sys.exit(f"--resume: no checkpoint at {last}")
        saved = torch.load(last, map_location="cpu", weights_only=False)["config"]
        preset = args.preset or saved.pop("preset")
        saved.pop("preset", None)
        saved["run_dir"] = args.run_dir         # the folder resumed from, also when moved or copied
        cfg = make_config(preset, **{**saved, **{k: v for k, v in overrides.items() if v is not None}})
    else:
        preset = args.preset or ("paper" if torch.cuda.is_available() else "tiny")
        decoder = args.decoder_conv or "d2conv-xyz"
        run_dir = args.run_dir or f"runs/{preset}-{decoder}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = make_config(preset, run_dir=run_dir, **overrides)

    trainer = Trainer(cfg)
    try:
        if args.resume:
            trainer.resume()
        summary = trainer.fit()
    except NonFiniteLoss as error:
        print(f"stopped: {error}; the last good checkpoint is kept in {cfg.run_dir}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"\ninterrupted: saved {cfg.run_dir}/last.pt", file=sys.stderr)
        return 130
    finally:
        trainer.close()
    if trainer.main:
        last = summary["last"]
        scores = (f"validation J&F {last['J&F']:.3f} (J {last['J']:.3f}, F {last['F']:.3f}, "
                  f"foreground IoU {last['iou']:.3f})" if last else "no validation in this run")
        print(f"step {summary['step']}: {scores}; best J&F {summary['best_jf']:.3f}")
        print(f"checkpoint: {summary['checkpoint']} (last: {cfg.run_dir}/last.pt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
