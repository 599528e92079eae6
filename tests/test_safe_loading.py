"""Files from elsewhere run nothing: a hostile checkpoint or VMZ pickle (each would create a file if
what it names were called) is refused in one line and the file is not created; a checkpoint of
another model, a config naming an unknown backbone, a trainer checkpoint or a corrupt file given
as backbone weights: one line each. Checkpoints written before the RNG state became plain values
still load."""
import pickle
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import train
from d2conv.checkpoints import load_checkpoint
from d2conv.config import make_config
from d2conv.data.synthetic import generate
from d2conv.trainer import rng_state, set_rng_state
from helpers import one_line_error

pytestmark = pytest.mark.usefixtures("reference_on_cpu")
REPO = Path(__file__).resolve().parents[1]


class Creates:
    """Unpickled, calls open(path, "w"): the file appears if anything in a pickle runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def marker(tmp_path):
    """A path a hostile file would create; the fixture shows such a pickle does create it when
    loaded without restriction, so the tests that it is not created can fail."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Creates(probe), protocol=2)).close()
    assert probe.exists()
    return tmp_path / "ran"


def checkpoint(path, **fields):
    """A trainer-checkpoint-shaped file: the tiny preset's config and the given entries."""
    state = dict(model={}, config=asdict(make_config("tiny")), step=0, epoch=0, best=0.0)
    torch.save({**state, **fields}, path)
    return path


def test_a_hostile_checkpoint_runs_nothing(tmp_path, marker, capsys):
    evil = checkpoint(tmp_path / "evil.pt", model=Creates(marker))
    assert evaluate.main(["--checkpoint", str(evil)]) == 2
    err = one_line_error(capsys, evil, "io.open")
    assert "nothing in it ran" in err
    assert not marker.exists()
    run = tmp_path / "run"
    run.mkdir()
    checkpoint(run / "last.pt", rng=Creates(marker))
    assert train.main(["--run-dir", str(run), "--resume"]) == 2
    one_line_error(capsys, run / "last.pt", "io.open")
    assert not marker.exists()


def test_a_hostile_vmz_pickle_runs_nothing(tmp_path, marker):
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": Creates(marker)}}, f, protocol=2)
    run = subprocess.run([sys.executable, "-m", "d2conv.weights", "convert", str(evil),
                          str(tmp_path / "out.pt")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert str(evil) in run.stderr and "io.open" in run.stderr
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos") / "synthetic"
    generate(root, n_train=1, n_val=1, frames=8, height=64, width=96, seed=1)
    return root


def train_args(videos, run_dir, *extra):
    return ["--preset", "tiny", "--data", str(videos), "--run-dir", str(run_dir),
            "--workers", "0", "--batch-size", "2", "--max-steps", "1", *extra]


def test_backbone_weights_that_are_not_backbone_weights(videos, tmp_path, marker, capsys):
    run = tmp_path / "run"
    trainer_file = checkpoint(tmp_path / "best.pt")
    assert train.main(train_args(videos, run, "--backbone-weights", str(trainer_file))) == 2
    one_line_error(capsys, trainer_file, "trainer checkpoint")
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x02}q\x00(X\x05\x00\x00\x00blobs")        # cut short
    assert train.main(train_args(videos, run, "--backbone-weights", str(corrupt))) == 2
    one_line_error(capsys, corrupt, "not a readable Caffe2 pickle")
    other = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    assert train.main(train_args(videos, run, "--backbone-weights", str(other))) == 2
    one_line_error(capsys, other, "another model's weights", "missing", "unexpected: conv.weight")
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": Creates(marker)}}, f, protocol=2)
    assert train.main(train_args(videos, run, "--backbone-weights", str(evil))) == 2
    one_line_error(capsys, evil, "io.open")
    assert not marker.exists() and not run.exists()


def test_a_checkpoint_of_another_model_or_config_is_one_line(tmp_path, capsys):
    other = checkpoint(tmp_path / "other.pt", model={"head.weight": torch.zeros(1, 2, 3)})
    assert evaluate.main(["--checkpoint", str(other)]) == 2
    one_line_error(capsys, other, "another model's weights", "missing", "head.weight")
    config = asdict(make_config("tiny"))
    unknown = checkpoint(tmp_path / "unknown.pt", config={**config, "backbone": "../../x"})
    assert evaluate.main(["--checkpoint", str(unknown)]) == 2
    one_line_error(capsys, unknown, "backbone must be one of", "'../../x'")
    typed = checkpoint(tmp_path / "typed.pt", config={**config, "mdim": "32"})
    assert evaluate.main(["--checkpoint", str(typed)]) == 2
    one_line_error(capsys, typed, "mdim must be a int")


def test_the_rng_state_is_plain_and_older_numpy_states_still_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = checkpoint(tmp_path / "new.pt", rng=rng_state())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    expected = random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    older = dict(rng_state(), numpy=np.random.get_state())      # numpy's state as an array
    path = checkpoint(tmp_path / "older.pt", rng=older, best=np.float64(0.5))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) != []
    state = load_checkpoint(path)
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert state["best"] == 0.5
