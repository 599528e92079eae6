"""The trainer: resume equals an uninterrupted run, the non-finite-loss stop, Ctrl-C, the sampler,
and a 2-process gloo DDP run through torchrun."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import train
from d2conv import trainer as trainer_module
from d2conv.checkpoints import load_checkpoint
from d2conv.config import make_config
from d2conv.data.synthetic import generate
from d2conv.trainer import EpochSampler
from helpers import one_line_error

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
    """The run's last.pt, read as the tools read it (plain values and tensors only)."""
    return load_checkpoint(Path(run_dir) / "last.pt")


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


def test_sigterm_saves_like_ctrl_c_and_resume_continues(videos, tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's or timeout's) mid-run: last.pt holds the completed steps, one line
    says so, exit status 143; --resume then goes on to the end."""
    real = trainer_module.Trainer.train_step

    def terminated(self, batch):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert train.main(args(videos, tmp_path, "--max-steps", "5")) == 143
    assert weights(tmp_path)["step"] == 2
    assert "terminated (SIGTERM): saved" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before          # the handler before is back
    monkeypatch.setattr(trainer_module.Trainer, "train_step", real)
    assert train.main(args(videos, tmp_path, "--resume", "--max-steps", "4")) == 0
    assert weights(tmp_path)["step"] == 4
    out = capsys.readouterr().out
    assert "resumed from " in out and ": step 2, epoch 1 (batch 2 of it done)" in out


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
    assert result.stdout.count("next: ") == 1 and result.stdout.count("preset tiny") == 1


def test_warmup_and_predictor_learning_rate(videos, tmp_path, monkeypatch):
    """The warm-up scales each step's lr linearly and leaves the scheduler's lr in place; the
    sampling predictors get their own group at predictor_lr x lr."""
    seen = []
    real = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append([group["lr"] for group in self.param_groups])
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    cfg = make_config("tiny", data=str(videos), run_dir=str(tmp_path),
                                     batch_size=2, workers=0, lr=1e-3, predictor_lr=0.1,
                                     warmup_steps=4, max_steps=3)
    trainer = trainer_module.Trainer(cfg)
    trainer.fit()
    assert [round(lrs[0], 9) for lrs in seen] == [2.5e-4, 5e-4, 7.5e-4]
    assert all(abs(lrs[1] - 0.1 * lrs[0]) < 1e-12 for lrs in seen)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-4]


def test_bad_input_is_one_line_and_leaves_no_run_folder(videos, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(args(tmp_path / "nonexistent", run)) == 2
    one_line_error(capsys, tmp_path / "nonexistent")
    assert train.main(args(videos, run, "--backbone-weights", str(tmp_path / "w.pt"))) == 2
    one_line_error(capsys, "--backbone-weights", tmp_path / "w.pt")
    no_sets = tmp_path / "no_sets"
    shutil.copytree(videos, no_sets)
    shutil.rmtree(no_sets / "ImageSets")
    assert train.main(args(no_sets, run)) == 2
    one_line_error(capsys, no_sets / "ImageSets/2017/train.txt")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(videos, corrupt)
    bad = corrupt / "JPEGImages/480p/val_000/00004.jpg"
    bad.write_bytes(b"garbage")
    assert train.main(args(corrupt, run)) == 2                    # found before training
    one_line_error(capsys, bad)
    assert not run.exists()
    run.mkdir()
    (run / "last.pt").write_text("not a checkpoint")
    assert train.main(args(videos, run, "--resume")) == 2
    one_line_error(capsys, run / "last.pt")


def test_a_frame_that_fails_to_decode_stops_with_one_line(videos, tmp_path, capsys):
    """A JPEG whose header reads but whose data is cut: the DataLoader worker's error becomes
    one line naming the file, and the steps done are saved."""
    data = tmp_path / "data"
    shutil.copytree(videos, data)
    for frame in (data / "JPEGImages/480p/train_000").glob("*.jpg"):
        frame.write_bytes(frame.read_bytes()[:-300])              # header whole, data cut
    assert train.main(args(data, tmp_path / "run", "--workers", "1")) == 2
    one_line_error(capsys, data / "JPEGImages/480p/train_000")
    assert weights(tmp_path / "run")["step"] == 0


def test_last_checkpoint_is_written_before_validation(videos, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("validation failed")

    monkeypatch.setattr(trainer_module, "validate", broken)
    with pytest.raises(RuntimeError, match="validation failed"):
        train.main(args(videos, tmp_path))
    state = weights(tmp_path)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (5, 1, 0)


def test_train_and_evaluate_print_the_same_scores(videos, tmp_path, monkeypatch, capsys):
    """Validation is the evaluation protocol: evaluate.py on the run's best.pt prints the J&F and
    IoU train.py printed for it. Output to a file or pipe gets plain lines, no redrawn bars."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(args(videos, tmp_path / "run", "--log-every", "2")) == 0
    out = capsys.readouterr()
    assert "\r" not in out.out + out.err and "epoch 1/2 step 2/10: loss" in out.out
    validations = [line for line in out.out.splitlines() if line.startswith("validation after")]
    assert len(validations) == 2 and "best so far: best.pt" in validations[0]
    best = weights(tmp_path / "run")["best_scores"]
    assert f"IoU {best['iou']:.3f}, J&F {best['J&F']:.3f}" in out.out
    assert f"next: python evaluate.py --checkpoint {tmp_path / 'run' / 'best.pt'}" in out.out
    assert evaluate.main(["--checkpoint", str(tmp_path / "run" / "best.pt")]) == 0
    printed = capsys.readouterr().out
    assert f"IoU {best['iou']:.3f}, J&F {best['J&F']:.3f}" in printed
    row = (tmp_path / "run/results_5/global_results-val.csv").read_text().splitlines()[1]
    assert row.startswith(f"{best['J&F']:.3f},{best['J']:.3f},")
    assert f"train.py's validation prints it): {best['iou']:.3f}" in printed


def test_default_preset_and_the_paper_warning(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.default_preset(None)[0] == "tiny"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.default_preset(None)[0] == "small"
    assert train.default_preset("w.pt")[0] == "paper"
    train.announce(make_config("small", run_dir="runs/x"), "a GPU and no --backbone-weights")
    out = capsys.readouterr()
    assert "preset small (the default with a GPU" in out.out and "--preset paper" in out.out
    assert out.err == ""
    train.announce(make_config("paper", run_dir="runs/x"), None)
    out = capsys.readouterr()
    assert "WARNING" in out.err and "RANDOM weights" in out.err and "--backbone-weights" in out.err
    first = out.out.splitlines()[0]           # without --data the first line says what it trains on
    assert first.startswith("preset paper: ON THE SYNTHETIC VIDEOS, not DAVIS") and "--data" in first
    train.announce(make_config("paper", data="/data/DAVIS", run_dir="runs/x",
                               backbone_weights="w.pt"), None)
    out = capsys.readouterr()
    assert "DAVIS-2017 train" in out.out.splitlines()[0] and "SYNTHETIC" not in out.out
    assert out.err == ""


def test_paper_preset_is_the_original_recipe(videos, tmp_path):
    """Frames drawn with replacement, no augmentation, Lovász hinge, Adam 1e-5 with StepLR
    (10, 0.1) over 20 epochs, 2 clips a GPU, clipping at 10, frames resized to 480x854."""
    cfg = make_config("paper")
    assert (cfg.replacement, cfg.augment, cfg.loss, cfg.optimizer, cfg.lr, cfg.scheduler,
            cfg.step_epochs, cfg.gamma, cfg.epochs, cfg.batch_size, cfg.clip_grad,
            tuple(cfg.size), cfg.backbone) == (True, False, "lovasz", "adam", 1e-5, "step", 10,
                                               0.1, 20, 2, 10.0, (480, 854), "ir_csn_152")
    small = make_config("paper", data=str(videos), backbone="ir_csn_tiny", mdim=8, size=(64, 96),
                        workers=0, run_dir=str(tmp_path))
    trainer = trainer_module.Trainer(small)
    assert trainer.dataset.replace and not trainer.dataset.augment
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.StepLR)
