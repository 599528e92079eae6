"""VMZ Caffe2 import: a synthetic pickle with the real blob names and shapes, made here from the
ir-CSN-50 model independently of ``d2conv.weights.blob_map``, round-trips exactly, directly and
through ``python -m d2conv.weights convert``; bad pickles raise errors naming the blob."""
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2conv.backbones import ir_csn_50
from d2conv.weights import convert, load_backbone_weights, load_caffe2_pickle

pytestmark = pytest.mark.usefixtures("reference_on_cpu")

ROOT = Path(__file__).resolve().parents[1]


def vmz_names(model):
    """[(blob name, module, attribute)] following the VMZ naming, blocks numbered across stages."""
    bn = lambda prefix, m: [(f"{prefix}_{s}", m, a) for s, a in
                            (("s", "weight"), ("b", "bias"), ("rm", "running_mean"), ("riv", "running_var"))]
    out = [("conv1_w", model.stem.conv, "weight")] + bn("conv1_spatbn_relu", model.stem.bn)
    blocks = [b for stage in model.stages for b in stage]
    assert len(blocks) == 16
    for i, b in enumerate(blocks):
        for k, conv, norm in (("1", b.conv1, b.bn1), ("3", b.conv2, b.bn2), ("4", b.conv3, b.bn3)):
            out += [(f"comp_{i}_conv_{k}_w", conv, "weight")] + bn(f"comp_{i}_spatbn_{k}", norm)
        if i in (0, 3, 7, 13):
            out += [(f"shortcut_projection_{i}_w", b.shortcut_conv, "weight")]
            out += bn(f"shortcut_projection_{i}_spatbn", b.shortcut_bn)
    return out


@pytest.fixture(scope="module")
def model():
    return ir_csn_50()


@pytest.fixture
def blobs(model):
    rng = np.random.default_rng(0)
    blobs = {name: rng.standard_normal(tuple(getattr(m, a).shape)).astype(np.float32)
             for name, m, a in vmz_names(model)}
    assert blobs["comp_1_conv_3_w"].shape == (64, 1, 3, 3, 3)
    blobs["last_out_L400_w"] = rng.standard_normal((400, 2048)).astype(np.float32)
    blobs["last_out_L400_b"] = rng.standard_normal(400).astype(np.float32)
    return blobs


def write_pickle(path, blobs):
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    return path


def assert_loaded(model, blobs):
    names = vmz_names(model)
    assert len(names) == len(model.state_dict()) == 265     # every tensor has exactly one blob
    for name, m, a in names:
        np.testing.assert_array_equal(getattr(m, a).detach().numpy(), blobs[name], err_msg=name)


def test_load_pickle(tmp_path, model, blobs):
    path = write_pickle(tmp_path / "ir_csn_50.pkl", blobs)
    load_backbone_weights(model, path)
    assert_loaded(model, blobs)


def test_convert_command(tmp_path, model, blobs):
    src = write_pickle(tmp_path / "ir_csn_50.pkl", blobs)
    dst = tmp_path / "out" / "ir_csn_50.pt"
    run = subprocess.run([sys.executable, "-m", "d2conv.weights", "convert", str(src), str(dst),
                          "--depth", "50"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    print(run.stdout)
    assert "265 tensors" in run.stdout
    assert [p.name for p in dst.parent.iterdir()] == ["ir_csn_50.pt"]     # no temp file left
    load_backbone_weights(model, dst)
    assert_loaded(model, blobs)


def test_wrong_shape(model, blobs):
    blobs["comp_5_conv_3_w"] = np.zeros((128, 1, 3, 3, 1), np.float32)
    with pytest.raises(ValueError, match=r"comp_5_conv_3_w.*\(128, 1, 3, 3, 1\).*\(128, 1, 3, 3, 3\)"):
        convert(blobs, model)


def test_missing_blob(model, blobs):
    del blobs["shortcut_projection_7_spatbn_riv"]
    with pytest.raises(ValueError, match="shortcut_projection_7_spatbn_riv"):
        convert(blobs, model)


def test_leftover_blob(model, blobs):
    blobs["comp_16_conv_1_w"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError, match="comp_16_conv_1_w"):
        convert(blobs, model)


def test_unreadable_files(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_caffe2_pickle(tmp_path / "nope.pkl")
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_backbone_weights(model, tmp_path / "nope.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pkl"):
        load_caffe2_pickle(tmp_path / "junk.pkl")
