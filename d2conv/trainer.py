"""Training (docs/training.md): the loop, validation, checkpoints, resume, DDP and logging.

One process per GPU under torchrun (DDP, rank 0 alone writes and prints), or a single process on
a GPU or the CPU. The global batch is ``batch_size x world_size`` clips. ``last.pt`` and
``best.pt`` in the run directory are written atomically and hold everything needed to continue
exactly: model, optimizer, scheduler, RNG states, the epoch and the batches already done in it,
the step and the config. ``last.pt`` is written at the end of every epoch before its validation,
and on Ctrl-C; a non-finite loss stops the run keeping the last good checkpoint. Validation runs
the evaluation protocol (``d2conv.evaluation.validate``: whole videos, clips every ``val_gap``
frames, DAVIS-2016 ground truth), so its numbers are those ``evaluate.py`` prints for the same
checkpoint; the best validation J&F is kept as ``best.pt``.
"""
import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

import kernels
from kernels import tuning

from .checkpoints import load_checkpoint, load_weights
from .config import build_model
from .data import ClipDataset, check_files, dataset_root, split_sequences
from .errors import InputError
from .evaluation import validate
from .graphs import GraphedForward
from .layers import predictor_parameters
from .losses import SegmentationLoss
from .model import to_device
from .progress import interactive, progress


class NonFiniteLoss(RuntimeError):
    pass


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    """Every RNG's state in types ``torch.load(weights_only=True)`` reads (numpy's key as a
    list)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return dict(python=random.getstate(),
                numpy=(name, key.tolist(), int(pos), int(has_gauss), float(cached)),
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(state):
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]      # key: a list, or an older array
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():   # a checkpoint from a host with more GPUs sets those present
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def minutes(seconds):
    """'9 min 48 s' / '48 s'."""
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def scores_line(scores):
    return (f"IoU {scores['iou']:.3f}, J&F {scores['J&F']:.3f} (J {scores['J']:.3f}, "
            f"F {scores['F']:.3f})")


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed()
        self.main = self.rank == 0
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.run_dir = Path(cfg.run_dir)     # created by the first file written into it

        # the data first: a bad path or file stops the run before anything is built or written
        if self.main:                        # the synthetic set is written once, by rank 0
            self.root = dataset_root(cfg.data, cfg.synthetic)
        if self.world > 1:
            dist.barrier()
        if not self.main:
            self.root = dataset_root(cfg.data, cfg.synthetic)
        train, self.val_sequences = (split_sequences(self.root, s) for s in ("train", "val"))
        if self.main:
            checked = check_files(train + self.val_sequences)
            clips = sum(len(s) for s in train)
            self.print(f"data: {self.root}: {len(train)} training videos ({clips} clips), "
                       f"{len(self.val_sequences)} validation videos; {checked} image headers "
                       f"checked")
        self.dataset = ClipDataset(train, clip_len=cfg.clip_len, size=tuple(cfg.size) or None,
                                   augment=cfg.augment, replace=cfg.replacement, seed=cfg.seed)
        self.sampler = EpochSampler(len(self.dataset), cfg.batch_size, cfg.seed, self.rank,
                                    self.world)
        if self.sampler.batches() == 0:
            raise InputError(f"the training set has {len(self.dataset)} clips: too few for "
                             f"batch_size={cfg.batch_size} on {self.world} process(es)")

        if not cfg.autotune:
            kernels.set_autotune(False)
        self.model = to_device(build_model(cfg), self.device)
        if cfg.backbone_weights:
            from .weights import load_backbone_weights
            load_backbone_weights(self.model.encoder, cfg.backbone_weights)
        if self.world > 1 and self.device.type == "cuda":
            # trainable BatchNorms (the ASPP's, a from-scratch backbone's) see the global batch,
            # as the original's SyncBatchNorm did; the frozen backbone BNs are not BatchNorms
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
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
        # captured at the first step; DDP's gradient all-reduce runs eagerly, so one GPU only
        self.graphs = cfg.cuda_graphs and self.device.type == "cuda" and self.world == 1
        self.graphed = None

        self.step = self.epoch = self.batch_in_epoch = 0
        self.best = -math.inf
        self.best_scores = self.last_scores = None
        self.tb = None

    def print(self, text):
        if self.main:
            print(text, flush=True)

    def _tensorboard(self):
        if self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tb = False
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tb"))
        return self.tb

    # ---- checkpoints ----
    def state(self):
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), rng=rng_state(),
                    step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch,
                    world=self.world, best=self.best, best_scores=self.best_scores,
                    scores=self.last_scores, config=asdict(self.cfg))

    def save(self, name):
        if self.main:
            save_atomic(self.state(), self.run_dir / name)

    def resume(self, path=None):
        path = Path(path or self.run_dir / "last.pt")
        state = load_checkpoint(path)
        load_weights(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.best = state["step"], state["epoch"], state["best"]
        self.best_scores = state.get("best_scores")
        self.batch_in_epoch = state["batch_in_epoch"]
        self.print(f"resumed from {path}: step {self.step}, epoch {self.epoch + 1} (batch "
                   f"{self.batch_in_epoch} of it done)")
        # checkpoints before the world size was stored resume at their batch index
        saved = state["config"]["batch_size"] * state["world"] if "world" in state else None
        global_batch = self.cfg.batch_size * self.world
        if saved is not None and saved != global_batch:
            # another global batch (other GPU count or batch size): go on at the same clip of
            # the epoch's permutation (to a whole batch: a few may repeat, none is skipped)
            clips = self.batch_in_epoch * saved
            self.batch_in_epoch = clips // global_batch
            self.print(f"resume: {clips} clips of epoch {self.epoch + 1} were done at a global "
                       f"batch of {saved}; going on at batch {self.batch_in_epoch} of "
                       f"{global_batch} clips")

    def log(self, **entry):
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **entry}) + "\n")
        tb = self._tensorboard()
        if tb:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    tb.add_scalar(key, value, self.step)

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
            logits = self.forward(clip)
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

    def forward(self, clip):
        """The model's training forward: its CUDA graphs' replay where ``self.graphs`` (captured
        on the first call), else eager (through DDP with several processes)."""
        if self.graphs and self.graphed is None:
            try:
                self.graphed = GraphedForward(self.model, clip, self.amp)
            except RuntimeError as error:       # an op the capture cannot take
                self.graphs = False
                reason = str(error).strip().splitlines()[0] if str(error).strip() else "error"
                self.print(f"CUDA graphs: the capture failed ({reason[:200]}); training "
                           f"eagerly (--no-cuda-graphs skips the attempt)")
        return (self.graphed or self.ddp)(clip)

    def total_steps(self):
        steps = self.cfg.epochs * self.sampler.batches()
        return min(steps, self.cfg.max_steps) if self.cfg.max_steps else steps

    def fit(self):
        cfg = self.cfg
        loader_args = dict(batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
                           num_workers=min(cfg.workers, len(os.sched_getaffinity(0))),
                           pin_memory=self.device.type == "cuda")
        self.started, self._timed_from, self._first_step_done = time.time(), None, None
        try:
            while self.epoch < cfg.epochs and not self._done():
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                self.dataset.set_epoch(self.epoch)
                loader = DataLoader(self.dataset, **loader_args)
                bar = progress(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                               initial=self.batch_in_epoch, total=self.sampler.batches(),
                               disable=not self.main)
                tick, clips = time.time(), 0
                for batch in bar:
                    loss = self.train_step(batch)
                    if self._first_step_done is None:
                        self._report_first_step()
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
                        if not interactive():
                            self._progress_line(loss.item(), lr, rate)
                        memory = {}
                        if self.device.type == "cuda":
                            memory["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                        self.log(step=self.step, epoch=self.epoch, loss=loss.item(), lr=lr,
                                 clips_per_s=rate, **memory)
                    if self._done():
                        break
                bar.close()
                if self.batch_in_epoch >= self.sampler.batches():   # the epoch is complete
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    self.scheduler.step()
                    self.save("last.pt")             # before validating: a crash there loses
                    if self.epoch % cfg.val_every == 0 or self.epoch == cfg.epochs:   # nothing
                        self.evaluate()
                        self.save("last.pt")         # with the scores and the best so far
                else:
                    self.save("last.pt")
        except (KeyboardInterrupt, InputError):
            self.save("last.pt")                     # the steps done so far are consistent
            raise
        if self.last_scores is None:        # stopped before any validation: validate once
            self.evaluate()
            self.save("last.pt")
        return self.summary()

    def _report_first_step(self):
        """On a GPU, how long this process's first step took and how much of it went to tuning
        the kernels (a new shape's candidates are compiled and timed once, then read from the
        cache file)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._first_step_done = time.time()
        if self.device.type != "cuda":
            return
        tuned = tuning.stats()
        seconds = self._first_step_done - self.started
        if tuned["timed"]:
            what = (f"{tuned['seconds']:.1f} s of it tuning the kernels for {tuned['timed']} "
                    f"new shapes" + (f", kept in {tuned['file']}" if tuned["file"] else ""))
        elif tuned["read"]:
            what = f"the kernels' configs for {tuned['read']} shapes read from {tuned['file']}"
        else:
            what = "the kernels at their default configs" if not kernels.settings.autotune() \
                else "nothing tuned"
        self.print(f"first step: {seconds:.1f} s ({what})")

    def _progress_line(self, loss, lr, rate):
        """A plain log line, where no progress bar is drawn (output to a file or a pipe). The
        time left is timed from the first such line on, after the kernels' first compiles."""
        total, now = self.total_steps(), time.time()
        if self._timed_from is None:
            self._timed_from = now, self.step
        start, first = self._timed_from
        left = (f", about {minutes((now - start) / (self.step - first) * (total - self.step))} "
                f"left" if self.step > first else "")
        self.print(f"epoch {self.epoch + 1}/{self.cfg.epochs} step {self.step}/{total}: loss "
                   f"{loss:.4f}, lr {lr:.2e}, {rate:.1f} clips/s{left}")

    def _done(self):
        return bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def evaluate(self):
        cfg = self.cfg
        scores, seconds = None, 0.0
        if self.main:
            tick = time.time()
            scores = validate(self.model, self.val_sequences, cfg.clip_len, cfg.val_gap,
                              self.amp, tuple(cfg.size) or None)
            self.model.train()
            seconds = time.time() - tick
        if self.world > 1:
            box = [scores]
            dist.broadcast_object_list(box, src=0)
            scores = box[0]
        self.last_scores = dict(scores, epoch=self.epoch, step=self.step)
        self.log(step=self.step, epoch=self.epoch, **{f"val_{k}": v for k, v in scores.items()})
        best = scores["J&F"] > self.best
        if best:
            self.best, self.best_scores = scores["J&F"], self.last_scores
            self.save("best.pt")
        where = (f"epoch {self.epoch}/{cfg.epochs}" if self.batch_in_epoch == 0 else
                 f"epoch {self.epoch + 1}/{cfg.epochs}, batch {self.batch_in_epoch}")
        note = ("best so far: best.pt" if best else
                f"best J&F {self.best:.3f} at step {self.best_scores['step']}")
        self.print(f"validation after {where} (step {self.step}, {minutes(seconds)}): "
                   f"{scores_line(scores)}; {note}")
        return scores

    def summary(self):
        return dict(step=self.step, epoch=self.epoch, last=self.last_scores,
                    best=self.best_scores, checkpoint=str(self.run_dir / "best.pt"),
                    seconds=time.time() - self.started)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

