"""Every numeric option of train.py and evaluate.py is range-checked when parsed: a bad value is
one line naming the option and its allowed range, exit status 2, and nothing written."""
from dataclasses import asdict

import pytest
import torch

import evaluate
import train
from d2conv.config import build_model, make_config
from helpers import one_line_error

TRAIN_BAD = [("--batch-size", "0", ">= 1"), ("--epochs", "-1", ">= 1"), ("--epochs", "0", ">= 1"),
             ("--max-steps", "-5", ">= 1"), ("--max-steps", "0", ">= 1"),
             ("--lr", "0", "> 0"), ("--lr", "-0.001", "> 0"), ("--lr", "nan", "> 0"),
             ("--lr", "inf", "> 0"), ("--workers", "-1", ">= 0"), ("--log-every", "0", ">= 1"),
             ("--seed", "-1", "[0, 4294967295]"), ("--seed", str(2**32), "[0, 4294967295]"),
             ("--batch-size", "two", ">= 1")]
EVALUATE_BAD = [("--temporal-gap", "0", ">= 1"), ("--temporal-gap", "-3", ">= 1"),
                ("--clips-per-batch", "0", ">= 1"), ("--clips-per-batch", "1.5", ">= 1")]


@pytest.mark.parametrize("option, value, allowed", TRAIN_BAD)
def test_train_rejects_out_of_range_options(option, value, allowed, tmp_path, monkeypatch,
                                            capsys):
    monkeypatch.chdir(tmp_path)                 # the default run folder would be runs/...
    assert train.main(["--preset", "tiny", option, value]) == 2
    one_line_error(capsys, f"argument {option}", allowed, repr(value))
    assert train.main(["--run-dir", str(tmp_path / "run"), option, value]) == 2
    one_line_error(capsys, option, allowed)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value, allowed", EVALUATE_BAD)
def test_evaluate_rejects_out_of_range_options(option, value, allowed, tmp_path, monkeypatch,
                                               capsys):
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["--checkpoint", str(tmp_path / "best.pt"), "--out",
                          str(tmp_path / "out"), option, value]) == 2
    one_line_error(capsys, f"argument {option}", allowed, repr(value))
    assert list(tmp_path.iterdir()) == []


def test_other_argparse_errors_are_one_line_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.main(["--preset", "huge"]) == 2
    one_line_error(capsys, "--preset", "huge")
    assert evaluate.main(["--no-such-option"]) == 2
    one_line_error(capsys, "--no-such-option")
    assert list(tmp_path.iterdir()) == []


def test_a_gap_longer_than_the_clip_is_refused_before_writing(tmp_path, capsys):
    """A gap over the run's clip length would leave frames between clips unpredicted."""
    cfg = make_config("tiny", mdim=8)
    torch.save({"model": build_model(cfg).state_dict(), "config": asdict(cfg)},
               tmp_path / "best.pt")
    gap = cfg.clip_len + 1
    assert evaluate.main(["--checkpoint", str(tmp_path / "best.pt"), "--temporal-gap",
                          str(gap)]) == 2
    one_line_error(capsys, "--temporal-gap", f"[1, {cfg.clip_len}]", str(gap))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_valid_boundary_values_parse():
    args = train.parse_args(["--epochs", "1", "--max-steps", "1", "--batch-size", "1",
                             "--workers", "0", "--lr", "1e-5", "--log-every", "1", "--seed", "0"])
    assert (args.epochs, args.max_steps, args.batch_size, args.workers, args.lr,
            args.log_every, args.seed) == (1, 1, 1, 0, 1e-5, 1, 0)
    args = evaluate.parse_args(["--temporal-gap", "1", "--clips-per-batch", "1"])
    assert (args.temporal_gap, args.clips_per_batch) == (1, 1)
    assert train.parse_args([]).epochs is None and evaluate.parse_args([]).temporal_gap == 5
