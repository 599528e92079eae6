"""One training step of the paper's model: `pytest bench/test_model_speed.py` on a GPU.

ir-CSN-152 with backbone checkpointing (docs/model.md), batch 2 of 8x480x864 clips, bf16
autocast, Adam, gradient clipping (docs/training.md), with the dense 3DC-Seg decoder and with
D²Conv3D (xyz, modulated, in rf2 and rf3); each as the trainer runs it on one GPU
("triton+graphs": the model's Triton GroupNorm and depthwise convolutions, channels-last-3d
through ``d2conv.model.to_device``, the forward and backward replayed as CUDA graphs by
``d2conv.graphs``), the same eagerly ("triton"), and as it ran before those kernels ("pytorch":
profile_model.pytorch_ops, contiguous, eager). Records the median step time, the peak memory
allocated and reserved, and the parameter counts in <gpu>-model.json among the bench's records
(records.py).
"""
import contextlib
import time

import pytest
import torch

from d2conv.model import EncoderDecoder, to_device
from kernels import settings
from profile_model import pytorch_ops, training_step
from records import commit, gpu_name, merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a GPU")


def record(entry):
    """Merge one decoder's step into <gpu>-model.json, in place of an earlier one of the same
    decoder and ops."""
    gpu = gpu_name()
    merge(f"{gpu}-model.json", dict(gpu=gpu, **entry, torch=torch.__version__,
                                    triton=__import__("triton").__version__,
                                    autotuned=settings.autotune(),
                                    date=time.strftime("%Y-%m-%d"), commit=commit()),
          key=("decoder_conv", "ops"))


@pytest.mark.parametrize("ops", ["triton+graphs", "triton", "pytorch"])
@pytest.mark.parametrize("decoder_conv", ["dense", "d2conv-xyz"])
def test_train_step(benchmark, decoder_conv, ops):
    context = pytorch_ops() if ops == "pytorch" else contextlib.nullcontext()
    with context:
        train_step(benchmark, decoder_conv, ops)


def train_step(benchmark, decoder_conv, ops):
    torch.manual_seed(0)
    model = EncoderDecoder("ir_csn_152", decoder_conv, checkpoint=True)
    model = (model.cuda() if ops == "pytorch" else to_device(model, "cuda")).train()
    one_step = training_step(model, graphs=ops == "triton+graphs")

    def step():
        loss = one_step()
        torch.cuda.synchronize()
        return loss

    start = time.time()
    step()                                     # compiles / tunes the kernels, captures graphs
    first_s = time.time() - start
    torch.cuda.reset_peak_memory_stats()
    loss = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
    params = sum(p.numel() for p in model.parameters())
    entry = dict(decoder_conv=decoder_conv, ops=ops, channels_last=ops != "pytorch",
                 batch=2, clip="8x480x864",
                 dtype="bfloat16-autocast",
                 median_ms=benchmark.stats.stats.median * 1e3,
                 peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                 # graphs replay into memory they reserved when captured, which the allocated
                 # peak of the timed steps does not see
                 reserved_mib=torch.cuda.max_memory_reserved() / 2**20, params=params,
                 backbone_params=sum(p.numel() for p in model.encoder.parameters()),
                 first_step_s=first_s)
    benchmark.extra_info.update(entry)
    record(entry)
