"""The trainer: resume equals an uninterrupted run, the non-finite-loss stop, Ctrl-C, the sampler,
and a 2-process gloo DDP run through torchrun."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from d2conv import trainer as trainer_module
from d2conv.data.synthetic import generate
from d2conv.trainer import EpochSampler

pytestmark = pytest.mark.usefixtures("reference_on_cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A tiny synthetic DAVIS-layout set: one training and one validation video of 10 frames,
    so an epoch is 10 clips (5 steps at batch 2)."""
    root = tmp_path_factory.mktemp("videos") / "synthetic"
    generate(root, n_train=1, n_val=1, frames=10, height=64, width=96, seed=1)
    return root


def args(videos, run_dir, *extra):
    return ["--preset", "tiny", "--data", str(videos), "--run-dir", str(run_dir), "--workers", "0",
            "--batch-size", "2", "--epochs", "2", *extra]


def weights(run_dir):
    return torch.load(Path(run_dir) / "last.pt", weights_only=False)


def test_resume_equals_an_uninterrupted_run(videos, tmp_path, monkeypatch):
    # on the CPU, where a step is deterministic: on a GPU the kernels' fp32 atomics (and cuDNN)
    # change the last bits run to run, and Adam amplifies them, so equality is not promised there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # 5 steps an epoch: step 4 stops mid-epoch, step 8 is 3 steps into the second epoch
    assert train.main(args(videos, tmp_path / "once", "--max-steps", "8")) == 0
    assert train.main(args(videos, tmp_path / "twice", "--max-steps", "4")) == 0
    assert weights(tmp_path / "twice")["step"] == 4
    assert weights(tmp_path / "twice")["batch_in_epoch"] == 4
    assert train.main(args(videos, tmp_path / "twice", "--resume", "--max-steps", "8")) == 0
    once, twice = weights(tmp_path / "once"), weights(tmp_path / "twice")
    assert (once["step"], once["epoch"], once["batch_in_epoch"]) == (8, 1, 3)
    assert (twice["step"], twice["epoch"], twice["batch_in_epoch"]) == (8, 1, 3)
    for name, value in once["model"].items():
        assert torch.allclose(value, twice["model"][name], rtol=1e-5, atol=1e-6), name
    adam_steps = {int(s["step"]) for s in twice["optimizer"]["state"].values()}
    assert adam_steps == {8}
    logged = [json.loads(line) for line in open(tmp_path / "twice" / "log.jsonl")]
    assert any("val_J&F" in entry for entry in logged)
    assert (tmp_path / "twice" / "best.pt").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(videos, tmp_path, monkeypatch):
    assert train.main(args(videos, tmp_path, "--max-steps", "1")) == 0
    saved = (tmp_path / "last.pt").read_bytes()
    real = trainer_module.SegmentationLoss.forward
    monkeypatch.setattr(trainer_module.SegmentationLoss, "forward",
                        lambda self, *a: real(self, *a) * float("nan"))
    assert train.main(args(videos, tmp_path, "--resume", "--max-steps", "3")) == 3
    assert (tmp_path / "last.pt").read_bytes() == saved


def test_ctrl_c_saves_the_completed_steps(videos, tmp_path, monkeypatch):
    real = trainer_module.Trainer.train_step

    def interrupted(self, batch):
        if self.step == 2:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", interrupted)
    assert train.main(args(videos, tmp_path, "--max-steps", "5")) == 130
    assert weights(tmp_path)["step"] == 2


def test_epoch_sampler_splits_and_resumes():
    full = [list(EpochSampler(23, 3, seed=1, rank=r, world=2)) for r in range(2)]
    assert not set(full[0]) & set(full[1]) and len(full[0]) == len(full[1]) == 9
    late = EpochSampler(23, 3, seed=1, rank=0, world=2)
    late.set_epoch(0, start_batch=2)
    assert list(late) == full[0][6:]
    other = EpochSampler(23, 3, seed=1, rank=0, world=2)
    other.set_epoch(1)
    assert list(other) != full[0]


def test_resume_at_another_global_batch_goes_on_at_the_same_clip(videos, tmp_path, monkeypatch,
                                                                  capsys):
    """A run saved at batch 2 and resumed at batch 4 (as from 2 GPUs to 1 at batch 2 each)
    goes on after the clips already done: 4 clips = 1 batch of 4, not 2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(args(videos, tmp_path / "first", "--max-steps", "2")) == 0
    saved = weights(tmp_path / "first")
    assert (saved["batch_in_epoch"], saved["config"]["batch_size"], saved["world"]) == (2, 2, 1)
    # a copied run resumes in the copy, not in the folder its config names
    shutil.copytree(tmp_path / "first", tmp_path / "copy")
    assert train.main(args(videos, tmp_path / "copy", "--resume", "--batch-size", "4",
                           "--max-steps", "3")) == 0
    assert "4 clips of epoch 1 were done at a global batch of 2" in capsys.readouterr().out
    state = weights(tmp_path / "copy")  # 10 clips at batch 4: 2 batches, so the epoch is done
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 1, 0)
    assert weights(tmp_path / "first")["step"] == 2
    # and the clips: the first batch of 4 is the first two batches of 2
    small, large = EpochSampler(10, 2, seed=3), EpochSampler(10, 4, seed=3)
    large.set_epoch(0, start_batch=1)
    assert list(large) == list(small)[4:8]


def test_two_process_gloo_ddp(videos, tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29561", str(REPO / "train.py"),
               *args(videos, tmp_path, "--max-steps", "3")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = weights(tmp_path)
    assert state["step"] == 3
    # 10 clips over 2 ranks at batch 2: 2 batches an epoch per rank
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    assert "checkpoint:" in result.stdout and result.stdout.count("checkpoint:") == 1


def test_warmup_and_predictor_learning_rate(videos, tmp_path, monkeypatch):
    """The warm-up scales each step's lr linearly and leaves the scheduler's lr in place; the
    sampling predictors get their own group at predictor_lr x lr."""
    seen = []
    real = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append([group["lr"] for group in self.param_groups])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    cfg = trainer_module.make_config("tiny", data=str(videos), run_dir=str(tmp_path),
                                     batch_size=2, workers=0, lr=1e-3, predictor_lr=0.1,
                                     warmup_steps=4, max_steps=3)
    trainer = trainer_module.Trainer(cfg)
    trainer.fit()
    assert [round(lrs[0], 9) for lrs in seen] == [2.5e-4, 5e-4, 7.5e-4]
    assert all(abs(lrs[1] - 0.1 * lrs[0]) < 1e-12 for lrs in seen)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-4]
