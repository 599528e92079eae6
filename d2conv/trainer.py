"""Training (SPEC §4): the loop, validation, checkpoints, resume, DDP and logging.

One process per GPU under torchrun (DDP, rank 0 alone writes and logs), or a single process on a
GPU or the CPU. The global batch is ``batch_size x world_size`` clips. ``last.pt`` and ``best.pt``
in the run directory are written atomically and hold everything needed to continue exactly:
model, optimizer, scheduler, RNG states, the epoch and the batches already done in it, the step
and the config. A non-finite loss stops the run (exit status 3) keeping the last good checkpoint;
Ctrl-C saves and exits (status 130).
"""
import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .data import build_clips, davis_sequences, load_frame, load_mask
from .data.synthetic import ensure as ensure_synthetic
from .inference import predict_video, resize_logits, segment
from .layers import predictor_parameters
from .losses import SegmentationLoss
from .metrics import davis_scores, f_measure, j_measure
from .model import EncoderDecoder


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: str = "synthetic"            # "synthetic" or a DAVIS root
    run_dir: str = "runs/tiny"
    backbone: str = "ir_csn_tiny"
    backbone_weights: str = ""         # converted VMZ weights (python -m d2conv.weights convert)
    decoder_conv: str = "d2conv-xyz"
    mdim: int = 32
    decoder_norm: bool = False         # GroupNorm after the GC and before the head (from scratch)
    fg_prior: float = 0.0              # > 0: the head's bias starts at this foreground log-odds
    clip_len: int = 8
    size: tuple = ()                   # resize frames to (H, W) for training; () keeps them
    augment: bool = True
    batch_size: int = 4                # clips per process
    lr: float = 1e-3
    predictor_lr: float = 1.0          # lr multiplier of the D²Conv / DCN size, offset and mask
                                       # predictors (zero-initialised, fan-in 27 x Cin)
    warmup_steps: int = 0              # linear lr warm-up over the first optimizer steps
    optimizer: str = "adam"            # adam | adamw
    weight_decay: float = 0.0
    scheduler: str = "step"            # step | cosine
    step_epochs: int = 10
    gamma: float = 0.1
    epochs: int = 20
    max_steps: int = 0                 # stop after this many optimizer steps (0: no limit)
    clip_grad: float = 10.0
    loss: str = "lovasz"               # lovasz | bce | bce+lovasz
    amp: bool = True                   # bf16 autocast on the GPU
    checkpoint: bool = False           # activation checkpointing of the backbone blocks
    workers: int = 2
    val_every: int = 1                 # epochs
    val_gap: int = 4                   # clip start spacing during validation
    log_every: int = 10
    seed: int = 0


PRESETS = {
    # the CPU default: the tiny model trained from scratch on the synthetic set, about 10 minutes
    # on two cores (64x96 frames, 8 epochs of 120 steps at about 0.5 s). From scratch it needs
    # the decoder's GroupNorms (else the head's ReLU dies and the output collapses to a constant),
    # the head's bias at the foreground prior, a warm-up, a batch of 8 (less gradient noise than
    # 4) and the sampling predictors at a tenth of the lr. Measured on 2 cores, validation IoU
    # after 960 steps: lr 2e-3 with cosine decay 0.627, lr 1e-3 step decay 0.597, 2e-3 step 0.589.
    # What limits the IoU is the number of steps, not these settings (bench/sweep_tiny.py,
    # results/*-tiny-sweep.json): `--epochs 32` (~40 minutes on 2 cores) reached 0.687 there,
    # 0.70-0.74 on a GPU. Clips of 4 frames step only 1.3x faster and learn less per step (0.600
    # after 1920 steps, 11.7 minutes on 2 cores).
    "tiny": dict(backbone="ir_csn_tiny", mdim=32, decoder_norm=True, fg_prior=0.12, batch_size=8,
                 lr=2e-3, scheduler="cosine", predictor_lr=0.1, warmup_steps=25, epochs=8,
                 loss="bce+lovasz", workers=1, checkpoint=False),
    # the paper's recipe (SPEC §4); backbone weights from the VMZ model zoo
    "paper": dict(backbone="ir_csn_152", mdim=256, batch_size=2, lr=1e-5, epochs=20,
                  step_epochs=10, gamma=0.1, loss="lovasz", size=(480, 854), checkpoint=True,
                  workers=4),
}


def make_config(preset, **overrides):
    """The preset's config with ``overrides`` (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown config options: {sorted(unknown)}")
    return TrainConfig(preset=preset, **values)


def build_model(cfg):
    """The EncoderDecoder a config describes: a TrainConfig, or the dict a checkpoint stores (its
    missing fields, from an older checkpoint, take their defaults). Trainer and evaluate.py both
    build through here, so a new model option cannot be forgotten by one of them."""
    if isinstance(cfg, dict):
        names = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in cfg.items() if k in names})
    return EncoderDecoder(cfg.backbone, cfg.decoder_conv, mdim=cfg.mdim,
                          checkpoint=cfg.checkpoint, decoder_norm=cfg.decoder_norm,
                          fg_prior=cfg.fg_prior or None)


class EpochSampler(Sampler):
    """This rank's share of a seeded permutation of one epoch, in whole batches, from a given
    batch on (resuming mid-epoch skips what was done without loading it)."""

    def __init__(self, n, batch_size, seed=0, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def batches(self):
        """Whole batches per epoch, the same on every rank (DDP steps in lockstep)."""
        return self.n // self.world // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        mine = torch.randperm(self.n, generator=g)[self.rank::self.world]
        return iter(mine[self.start_batch * self.batch_size:self.batches() * self.batch_size]
                    .tolist())

    def __len__(self):
        return (self.batches() - self.start_batch) * self.batch_size


def setup_distributed():
    """(rank, world_size, device) from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) "
                               f"visible: start at most that many processes per node (or hide "
                               f"the GPUs with CUDA_VISIBLE_DEVICES= to run on CPU with gloo)")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def save_atomic(obj, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():   # a checkpoint from a host with more GPUs sets those present
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def dataset_root(data):
    return ensure_synthetic() if data == "synthetic" else Path(data)


@torch.no_grad()
def validate(model, cfg, device, progress=True):
    """Whole-video inference on the validation split (DAVIS-2016 val lists): foreground IoU
    (mean over frames, empty vs empty = 1) and the DAVIS J&F."""
    model.eval()
    sequences = davis_sequences(dataset_root(cfg.data), "val", year=2016)
    amp = torch.bfloat16 if cfg.amp and device.type == "cuda" else None
    per_sequence, ious = {}, []
    for seq in tqdm(sequences, desc="validate", leave=False, disable=not progress):
        frames = torch.from_numpy(np.stack([load_frame(p) for p in seq.frames]))
        frames = frames.permute(0, 3, 1, 2).float() / 255                  # (N, 3, H, W)
        native = frames.shape[-2:]
        if cfg.size:        # infer at the training resolution, score at the native one
            frames = F.interpolate(frames, size=tuple(cfg.size), mode="bilinear",
                                   align_corners=False, antialias=True)
        logits = predict_video(model, frames, cfg.clip_len, cfg.val_gap, amp_dtype=amp)
        masks = segment(resize_logits(logits, native) if cfg.size else logits)
        pred = masks.numpy()
        annotated = [i for i, m in enumerate(seq.masks) if m is not None]
        gt = np.stack([load_mask(seq.masks[i]) for i in annotated])
        j = j_measure(pred[annotated], gt)
        per_sequence[seq.name] = {"J": j, "F": f_measure(pred[annotated], gt)}
        ious.extend(j.tolist())
    model.train()
    global_row, _ = davis_scores(per_sequence)
    return {"iou": float(np.mean(ious)), "J&F": global_row["J&F-Mean"],
            "J": global_row["J-Mean"], "F": global_row["F-Mean"]}


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed()
        self.main = self.rank == 0
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.run_dir = Path(cfg.run_dir)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        self.model = build_model(cfg).to(self.device)
        if cfg.backbone_weights:
            from .weights import load_backbone_weights
            load_backbone_weights(self.model.encoder, cfg.backbone_weights)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
                    if self.world > 1 else self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.predictor_lr != 1:
            # the sampling predictors start at zero with a fan-in of 27 x Cin: at the full Adam lr
            # their sizes / offsets and masks swing over the whole map within a few hundred steps
            predictors = {id(p) for p in predictor_parameters(self.model)}
            params = [dict(params=[p for p in params if id(p) not in predictors]),
                      dict(params=[p for p in params if id(p) in predictors],
                           lr=cfg.lr * cfg.predictor_lr)]
        opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
        self.optimizer = opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.step_epochs,
                                                          cfg.gamma)
                          if cfg.scheduler == "step" else
                          torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs))
        self.loss_fn = SegmentationLoss(cfg.loss)
        self.amp = torch.bfloat16 if cfg.amp and self.device.type == "cuda" else None

        if self.main:   # generate the synthetic set once, before other ranks look for it
            dataset_root(cfg.data)
        if self.world > 1:
            dist.barrier()
        self.dataset = build_clips(cfg.data, "train", clip_len=cfg.clip_len,
                                   size=tuple(cfg.size) or None, augment=cfg.augment,
                                   seed=cfg.seed)
        self.sampler = EpochSampler(len(self.dataset), cfg.batch_size, cfg.seed, self.rank,
                                    self.world)
        if self.sampler.batches() == 0:
            raise ValueError(f"the training set has {len(self.dataset)} clips: too few for "
                             f"batch_size={cfg.batch_size} on {self.world} process(es)")
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best = -math.inf
        self.log_file = self.run_dir / "log.jsonl"
        self.tb = self._tensorboard()

    def _tensorboard(self):
        if not self.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.run_dir / "tb"))

    # ---- checkpoints ----
    def state(self):
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), scaler=None, rng=rng_state(),
                    step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                    world=self.world, best=self.best, config=asdict(self.cfg))

    def save(self, name):
        if self.main:
            save_atomic(self.state(), self.run_dir / name)

    def resume(self, path=None):
        path = Path(path or self.run_dir / "last.pt")
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint to resume from: {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)   # RNG states stay CPU tensors
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.best = state["step"], state["epoch"], state["best"]
        self.batch_in_epoch = state["batch_in_epoch"]
        # checkpoints before the world size was stored resume at their batch index
        saved = state["config"]["batch_size"] * state["world"] if "world" in state else None
        global_batch = self.cfg.batch_size * self.world
        if saved is not None and saved != global_batch:
            # another global batch (other GPU count or batch size): go on at the same clip of
            # the epoch's permutation (to a whole batch: a few may repeat, none is skipped)
            clips = self.batch_in_epoch * saved
            self.batch_in_epoch = clips // global_batch
            if self.main:
                print(f"resume: {clips} clips of epoch {self.epoch + 1} were done at a global "
                      f"batch of {saved}; going on at batch {self.batch_in_epoch} of "
                      f"{global_batch} clips")

    def log(self, **entry):
        if not self.main:
            return
        with open(self.log_file, "a") as f:
            f.write(json.dumps({"time": time.time(), **entry}) + "\n")
        if self.tb is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tb.add_scalar(key, value, self.step)

    # ---- the loop ----
    def train_step(self, batch):
        scheduled = [group["lr"] for group in self.optimizer.param_groups]
        if self.step < self.cfg.warmup_steps:       # the scheduler's lr, scaled for this step
            for group, lr in zip(self.optimizer.param_groups, scheduled):
                group["lr"] = lr * (self.step + 1) / self.cfg.warmup_steps
        try:
            return self._train_step(batch)
        finally:                                    # the scheduler chains from its own lr
            for group, lr in zip(self.optimizer.param_groups, scheduled):
                group["lr"] = lr

    def _train_step(self, batch):
        clip = batch["clip"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        valid = batch["valid"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with (torch.autocast(self.device.type, dtype=self.amp) if self.amp
              else contextlib.nullcontext()):
            logits = self.ddp(clip)
        loss = self.loss_fn(logits.float(), target, valid)
        finite = torch.isfinite(loss.detach()).float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            raise NonFiniteLoss(f"non-finite loss {loss.item()} at step {self.step}")
        loss.backward()
        if self.cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.optimizer.step()
        return loss.detach()

    def fit(self):
        cfg = self.cfg
        loader_args = dict(batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
                           num_workers=cfg.workers, pin_memory=self.device.type == "cuda")
        try:
            while self.epoch < cfg.epochs and not self._done():
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                self.dataset.set_epoch(self.epoch)
                loader = DataLoader(self.dataset, **loader_args)
                bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                           initial=self.batch_in_epoch, total=self.sampler.batches(),
                           disable=not self.main, dynamic_ncols=True)
                tick, clips = time.time(), 0
                for batch in bar:
                    loss = self.train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    clips += batch["clip"].shape[0] * self.world
                    if self.step % cfg.log_every == 0 or self._done():
                        if self.world > 1:     # log the global batch's loss, not rank 0's share
                            dist.all_reduce(loss)            # a sum (gloo has no AVG)
                            loss /= self.world
                        rate = clips / (time.time() - tick)       # since the last log line
                        tick, clips = time.time(), 0
                        lr = self.optimizer.param_groups[0]["lr"]
                        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}",
                                        clips_s=f"{rate:.1f}")
                        memory = {}
                        if self.device.type == "cuda":
                            memory["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                        self.log(step=self.step, epoch=self.epoch, loss=loss.item(), lr=lr,
                                 clips_per_s=rate, **memory)
                    if self._done():
                        break
                if self.batch_in_epoch >= self.sampler.batches():   # the epoch is complete
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.scheduler.step()
                    if self.epoch % cfg.val_every == 0 or self.epoch == cfg.epochs:
                        self.evaluate()
                self.save("last.pt")
        except KeyboardInterrupt:
            self.save("last.pt")
            raise
        if self.best == -math.inf:          # stopped before any validation: validate once
            self.evaluate()
            self.save("last.pt")
        return self.summary()

    def _done(self):
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def evaluate(self):
        scores = validate(self.model, self.cfg, self.device, self.main) if self.main else None
        if self.world > 1:
            box = [scores]
            dist.broadcast_object_list(box, src=0)
            scores = box[0]
        self.last_scores = scores
        self.log(step=self.step, epoch=self.epoch, **{f"val_{k}": v for k, v in scores.items()})
        if scores["J&F"] > self.best:
            self.best = scores["J&F"]
            self.save("best.pt")
        return scores

    def summary(self):
        return dict(step=self.step, epoch=self.epoch, best_jf=self.best,
                    last=getattr(self, "last_scores", None),
                    checkpoint=str(self.run_dir / "best.pt"))

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
