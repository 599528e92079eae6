"""Inference by overlapping clips, result PNGs and the DAVIS evaluation, end to end on a tiny
synthetic set."""
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from d2conv.config import build_model, make_config
from d2conv.data import davis_sequences, load_mask
from d2conv.data.synthetic import generate
from d2conv.evaluation import (colormap, evaluate_results, position_scale, read_prediction,
                               run_model, scale_position, write_mask)
from d2conv.graphs import GraphedInference
from d2conv.inference import clip_starts, predict_video
from d2conv.model import EncoderDecoder
from helpers import one_line_error

pytestmark = pytest.mark.usefixtures("reference_on_cpu")


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis") / "synthetic"
    generate(root, n_train=1, n_val=2, frames=11, height=64, width=96, seed=3)
    return root


class SlotModel(torch.nn.Module):
    """Fake model: the logit of every pixel of clip slot t is 100 * (frame value) + the number of
    clips seen before, so merged logits reveal which clips covered each frame."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.seen = 0

    def forward(self, clip):                      # (B, 3, T, H, W)
        out = []
        for c in clip:
            out.append(c[:1] * 100 + self.seen)
            self.seen += 1
        return torch.stack(out)


@pytest.mark.parametrize("N, gap", [(11, 5), (11, 1), (8, 5), (5, 5), (20, 3)])
def test_each_frame_averages_exactly_the_clips_covering_it(N, gap):
    frames = torch.arange(N, dtype=torch.float32).view(N, 1, 1, 1).expand(N, 3, 32, 32) / 100
    logits = predict_video(SlotModel(), frames, clip_len=8, gap=gap, clips_per_batch=3)
    starts = clip_starts(N, 8, gap)
    for i in range(N):
        covering = [k for k, s in enumerate(starts) if s <= i < s + 8]
        assert covering, f"frame {i} not covered"
        expected = i + np.mean(covering)
        assert torch.allclose(logits[i], torch.tensor(expected, dtype=torch.float32)), i
    assert starts[0] == 0 and starts[-1] == max(0, N - 8)


def test_dilation_colours_pure_green_at_the_plain_grid():
    rgb = colormap(np.array([[0.5, 1.0, 3.0, 0.25, 9.0]]))[0].tolist()
    assert rgb == [[0, 0, 255], [0, 255, 0], [255, 0, 0], [0, 0, 255], [255, 0, 0]]
    narrowed, widened = colormap(np.array([[0.9, 1.1]]))[0]
    assert narrowed[2] > 0 == narrowed[0] and widened[0] > 0 == widened[2]
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(scale_position(position_scale(t)), t, atol=1e-12)
    assert scale_position(1.0) == 0.5


def test_prediction_formats(tmp_path):
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:4] = True
    write_mask(tmp_path / "a.png", mask)
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == "P" and set(np.unique(np.asarray(image))) == {0, 1}
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "b.png")
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[mask] = (200, 10, 10)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    for name in "abc":
        assert np.array_equal(read_prediction(tmp_path / f"{name}.png"), mask)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_prediction(tmp_path / "missing.png")


def copy_ground_truth(davis, results):
    for seq in davis_sequences(davis, "val", 2016, masks="davis2016"):
        for m in seq.masks:
            write_mask(results / seq.name / m.name, load_mask(m))


def test_ground_truth_as_results_scores_one(davis, tmp_path):
    copy_ground_truth(davis, tmp_path)
    global_row, rows, _ = evaluate_results(davis, tmp_path)
    assert global_row["J&F-Mean"] == global_row["J-Mean"] == global_row["F-Mean"] == 1.0
    assert len(rows) == 2
    seq = davis_sequences(davis, "val", 2016)[0]
    (tmp_path / seq.name / seq.masks[3].name).unlink()
    with pytest.raises(FileNotFoundError, match=seq.masks[3].stem):
        evaluate_results(davis, tmp_path)
    shutil.rmtree(tmp_path / seq.name)
    with pytest.raises(FileNotFoundError, match=seq.name):
        evaluate_results(davis, tmp_path)


def test_model_results_round_trip(davis, tmp_path):
    torch.manual_seed(0)
    model = EncoderDecoder("ir_csn_tiny", "d2conv-xyz", mdim=8)
    sequences = davis_sequences(davis, "val", 2016)
    timing = run_model(model, sequences, tmp_path, gap=5, save_probabilities=True,
                       save_dilation=True, save_logits=True)
    assert timing["frames"] == sum(len(s.frames) for s in sequences)
    for seq in sequences:
        written = sorted(p.name for p in (tmp_path / seq.name).glob("*.png"))
        assert written == [f.with_suffix(".png").name for f in seq.frames]
        assert np.load(tmp_path / "logits" / f"{seq.name}.npy").shape == (11, 64, 96)
    layers = sorted(p.name for p in (tmp_path / "dilation").iterdir() if p.is_dir())
    assert len(layers) == 10
    with Image.open(tmp_path / "dilation" / "legend.png") as legend:
        assert legend.mode == "RGB" and legend.width > legend.height
    global_row, rows, _ = evaluate_results(davis, tmp_path)
    assert 0.0 <= global_row["J-Mean"] <= 1.0 and len(rows) == 2


def test_graphed_inference_off_the_gpu_is_the_model(davis, tmp_path):
    """evaluate.py's wrapper runs a CPU model as it is: the same logits and dilation maps, in
    folders named by the model's own layers."""
    torch.manual_seed(0)
    model = EncoderDecoder("ir_csn_tiny", "d2conv-xyz", mdim=8)
    sequences = davis_sequences(davis, "val", 2016)[:1]
    for name, forward in (("model", model), ("graphed", GraphedInference(model))):
        run_model(forward, sequences, tmp_path / name, gap=5, save_logits=True,
                  save_dilation=True)
    logits = [np.load(tmp_path / name / "logits" / f"{sequences[0].name}.npy")
              for name in ("model", "graphed")]
    np.testing.assert_array_equal(*logits)
    layers = [sorted(p.name for p in (tmp_path / name / "dilation").iterdir() if p.is_dir())
              for name in ("model", "graphed")]
    assert layers[0] == layers[1] and len(layers[0]) == 10


def test_command_line_evaluation_only(davis, tmp_path, capsys):
    copy_ground_truth(davis, tmp_path)
    argv = ["--davis-path", str(davis), "--results-path", str(tmp_path)]
    assert evaluate.main(argv) == 0
    lines = (tmp_path / "global_results-val.csv").read_text().splitlines()
    assert lines == ["J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay",
                     "1.000,1.000,1.000,0.000,1.000,1.000,0.000"]
    assert (tmp_path / "per-sequence_results-val.csv").read_text().startswith(
        "Sequence,J-Mean,F-Mean\n")
    capsys.readouterr()
    assert evaluate.main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert evaluate.main(argv + ["--force", "--task", "semi-supervised"]) == 0
    assert "Global results for val" in capsys.readouterr().out


def test_command_line_errors_are_one_line(davis, tmp_path, capsys):
    copy_ground_truth(davis, tmp_path / "results")
    shutil.rmtree(tmp_path / "results" / "val_001")
    argv = ["--davis-path", str(davis), "--results-path", str(tmp_path / "results")]
    assert evaluate.main(argv) == 2
    one_line_error(capsys, "val_001", tmp_path / "results")
    assert evaluate.main(["--davis-path", str(tmp_path / "nowhere"), "--results-path",
                          str(tmp_path)]) == 2
    one_line_error(capsys, tmp_path / "nowhere")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    assert evaluate.main(["--checkpoint", str(tmp_path / "broken.pt")]) == 2
    one_line_error(capsys, tmp_path / "broken.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "absent.pt")]) == 2
    one_line_error(capsys, tmp_path / "absent.pt")


def test_command_line_model_mode(davis, tmp_path, capsys):
    """A trainer checkpoint in, masks and scores out; the saliency scores from probabilities."""
    cfg = make_config("tiny", data=str(davis), mdim=8)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "config": asdict(cfg)}, tmp_path / "best.pt")
    assert evaluate.main(["--checkpoint", str(tmp_path / "best.pt"), "--saliency"]) == 0
    out = capsys.readouterr().out
    assert "fps (model)" in out and "max F-measure" in out
    assert (tmp_path / "results_5" / "global_results-val.csv").exists()
