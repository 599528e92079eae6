"""One training step of the paper's model (SPEC §3/§4: ir-CSN-152, batch 2, 8x480x864, bf16
autocast, backbone checkpointing, Adam) with the dense 3DC-Seg decoder and with D²Conv3D (xyz,
modulated, rf2 + rf3): `pytest bench/test_model.py` on a GPU. Records the median step time and
the peak memory in bench/results/<gpu>-model.json (or the folder named by D2CONV_BENCH_RESULTS).
"""
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from d2conv.model import EncoderDecoder

RESULTS = Path(os.environ.get("D2CONV_BENCH_RESULTS", Path(__file__).parent / "results"))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a GPU")


def record(entry):
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{gpu}-model.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if r["decoder_conv"] != entry["decoder_conv"]]
    rows.append(dict(gpu=gpu, **entry, torch=torch.__version__,
                     triton=__import__("triton").__version__))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(sorted(rows, key=lambda r: r["decoder_conv"]), indent=1))
    os.replace(tmp, path)


@pytest.mark.parametrize("decoder_conv", ["dense", "d2conv-xyz"])
def test_train_step(benchmark, decoder_conv):
    torch.manual_seed(0)
    model = EncoderDecoder("ir_csn_152", decoder_conv, checkpoint=True).cuda().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    clip = torch.rand(2, 3, 8, 480, 864, device="cuda")
    target = (torch.rand(2, 1, 8, 480, 864, device="cuda") > 0.5).float()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(clip)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        torch.cuda.synchronize()
        return loss

    start = time.time()
    step()                                     # compiles / tunes the kernels
    first_s = time.time() - start
    torch.cuda.reset_peak_memory_stats()
    loss = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
    params = sum(p.numel() for p in model.parameters())
    entry = dict(decoder_conv=decoder_conv, batch=2, clip="8x480x864", dtype="bfloat16-autocast",
                 median_ms=benchmark.stats.stats.median * 1e3,
                 peak_mib=torch.cuda.max_memory_allocated() / 2**20, params=params,
                 backbone_params=sum(p.numel() for p in model.encoder.parameters()),
                 first_step_s=first_s)
    benchmark.extra_info.update(entry)
    record(entry)
