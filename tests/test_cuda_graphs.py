"""CUDA graphs: a network of these layers, captured after warm-up (which compiles and tunes the
kernels), replays equal to eager, forward and forward+backward; so does
``torch.compile(mode="reduce-overhead")``, which captures graphs itself, the trainer's graphed
training forward and evaluate.py's graphed inference (d2conv.graphs). GPU only."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2conv.evaluation import dilation_maps
from d2conv.graphs import GraphedForward, GraphedInference
from d2conv.layers import D2Conv2d, D2Conv3d, DeformConv2d
from d2conv.model import EncoderDecoder, to_device
from d2conv.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def detector_head():
    """A DCNv2-style 2D head (as a detector's last ResNet stages use them)."""
    torch.manual_seed(0)
    net = nn.Sequential(DeformConv2d(64, 64, 3, padding=1, modulation=True), nn.ReLU(),
                        D2Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                        DeformConv2d(64, 32, 3, padding=1, offset_groups=4, modulation=True))
    for layer in net:                           # predictors start at zero: move them off it
        if hasattr(layer, "predictor"):
            nn.init.normal_(layer.predictor.weight, std=0.01)
    return net.cuda()


def video_block():
    torch.manual_seed(0)
    net = nn.Sequential(D2Conv3d(32, 32, 3, padding=1), nn.ReLU(), D2Conv3d(32, 16, 3, padding=1))
    for layer in net:
        if hasattr(layer, "predictor"):
            nn.init.normal_(layer.predictor.weight, std=0.01)
    return net.cuda()


CASES = {"2d": (detector_head, (4, 64, 32, 32)), "3d": (video_block, (2, 32, 4, 16, 16))}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_replay_equals_eager(case, dtype):
    make, shape = CASES[case]
    net = make().to(dtype)
    static_x = torch.randn(shape, device="cuda", dtype=dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):             # warm-up: compile (and tune) outside the capture
        for _ in range(2):
            net(static_x).float().square().mean().backward()
    torch.cuda.current_stream().wait_stream(stream)
    net.zero_grad(set_to_none=False)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = net(static_x)
        static_out.float().square().mean().backward()

    for seed in (1, 2):
        torch.manual_seed(seed)
        x = torch.randn(shape, device="cuda", dtype=dtype)
        static_x.copy_(x)
        net.zero_grad(set_to_none=False)
        graph.replay()
        replayed = static_out.clone(), [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=False)
        eager = net(x)
        eager.float().square().mean().backward()
        torch.testing.assert_close(replayed[0], eager, rtol=1e-5, atol=1e-5)
        for grad, p in zip(replayed[1], net.parameters()):
            # the input gradient's fp32 atomics add in another order each run
            torch.testing.assert_close(grad, p.grad, rtol=1e-3 if dtype == torch.float32 else 2e-2,
                                       atol=1e-5)


def test_compile_reduce_overhead_equals_eager():
    net = detector_head().eval()
    compiled = torch.compile(net, mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(4):                    # the first calls record, the later replay
            torch.manual_seed(seed)
            x = torch.randn(4, 64, 32, 32, device="cuda")
            torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-5)


def loss_and_grads(model, forward, clip, target):
    model.zero_grad(set_to_none=True)
    loss = F.binary_cross_entropy_with_logits(forward(clip).float(), target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("decoder", ["d2conv-xyz", "aspp"])
def test_graphed_training_forward_equals_eager(decoder):
    """The trainer's graphed forward and backward, on a small model with checkpointing: loss,
    gradients and buffer updates (the ASPP's BatchNorm statistics) equal to eager on new clips;
    the warm-up leaves the buffers as they were; another clip shape and eval mode run the
    model's own forward."""
    torch.manual_seed(0)
    model = EncoderDecoder("ir_csn_tiny", decoder, mdim=16, checkpoint=True)
    for layer in model.modules():               # predictors start at zero: move them off it
        if hasattr(layer, "predictor"):
            nn.init.normal_(layer.predictor.weight, std=0.01)
    model = to_device(model, "cuda").train()
    shape = (2, 3, 4, 64, 96)
    target = (torch.rand(2, 1, *shape[2:], device="cuda") > 0.5).float()
    buffers = [b.clone() for b in model.buffers()]
    graphed = GraphedForward(model, torch.rand(shape, device="cuda"))
    assert "forward" not in vars(model)         # the model keeps its own forward
    for before, after in zip(buffers, model.buffers()):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    for seed in (1, 2):
        torch.manual_seed(seed)
        clip = torch.rand(shape, device="cuda")
        saved = [b.clone() for b in model.buffers()]
        replayed = loss_and_grads(model, graphed, clip, target)
        replayed_buffers = [b.clone() for b in model.buffers()]
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)
        eager = loss_and_grads(model, model, clip, target)
        for graph_buffer, eager_buffer in zip(replayed_buffers, model.buffers()):
            torch.testing.assert_close(graph_buffer, eager_buffer, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(replayed[0], eager[0], rtol=1e-5, atol=0)
        for graph_grad, eager_grad in zip(replayed[1], eager[1]):
            # the input gradient's fp32 atomics add in another order each run
            torch.testing.assert_close(graph_grad, eager_grad, rtol=1e-3, atol=1e-6)
    other = torch.rand(2, 3, 4, 32, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(graphed(other), model(other), rtol=1e-5, atol=1e-6)
        model.eval()
        torch.testing.assert_close(graphed(clip), model(clip), rtol=1e-5, atol=1e-6)


class HostRead(nn.Module):
    """A model whose forward reads a GPU value on the host, which no graph can capture; it counts
    its calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 1, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        out = self.conv(x)
        return out * 2 if out.sum().item() > 1e30 else out


def test_a_failed_capture_leaves_the_model_and_the_trainer_trains_eagerly(capsys):
    model = HostRead().cuda().train()
    x = torch.rand(2, 3, 2, 4, 4, device="cuda")
    with pytest.raises(RuntimeError):
        GraphedForward(model, x)
    assert "forward" not in vars(model) and model.calls.item() == 0
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.rand(1, device="cuda")        # the random generator is out of capture mode
    # the trainer's forward: one line, then eager steps
    trainer = SimpleNamespace(graphs=True, graphed=None, model=model, ddp=model, amp=None,
                              print=print)
    out = Trainer.forward(trainer, x)
    assert trainer.graphs is False and trainer.graphed is None
    assert "the capture failed" in capsys.readouterr().out
    torch.testing.assert_close(out, model.conv(x))


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_inference_equals_eager(amp):
    """Each clip shape runs eagerly at its first call and is captured at its second; replays of
    new clips equal the model's eager forward; gradients on, train mode and hooks' callers
    (dilation_maps) get the model itself."""
    torch.manual_seed(0)
    model = EncoderDecoder("ir_csn_tiny", "d2conv-xyz", mdim=16)
    for layer in model.modules():               # predictors start at zero: move them off it
        if hasattr(layer, "predictor"):
            nn.init.normal_(layer.predictor.weight, std=0.01)
    model = to_device(model, "cuda").eval()
    forward = GraphedInference(model)
    autocast = torch.autocast("cuda", dtype=amp, enabled=amp is not None)
    shapes = [(2, 3, 4, 64, 96), (1, 3, 4, 64, 96)]
    with torch.no_grad(), autocast:
        for call in range(3):
            for shape in shapes:
                clip = torch.rand(shape, device="cuda")
                torch.testing.assert_close(forward(clip), model(clip), rtol=1e-5, atol=1e-5)
            assert len(forward.graphs) == (0 if call == 0 else len(shapes))
        kept = forward(clip)
        forward(torch.rand(shapes[-1], device="cuda"))          # a replay of the same graph
        torch.testing.assert_close(kept, model(clip), rtol=1e-5, atol=1e-5)
    assert len(forward.graphs) == len(shapes) and not forward.failed
    clip = torch.rand(shapes[0], device="cuda")
    with autocast:                              # gradients on: eager, with a graph to follow
        out = forward(clip)
    assert out.grad_fn is not None
    maps = dilation_maps(forward, clip[0].transpose(0, 1), clip_len=4, amp_dtype=amp)
    assert maps and maps.keys() == dilation_maps(model, clip[0].transpose(0, 1), 4, amp).keys()


def test_a_failed_inference_capture_says_so_once_and_runs_eagerly(capsys):
    model = HostRead().cuda().eval()
    forward = GraphedInference(model)
    with torch.no_grad():
        for _ in range(4):
            x = torch.rand(2, 3, 2, 4, 4, device="cuda")
            torch.testing.assert_close(forward(x), model.conv(x))
    assert forward.failed and not forward.graphs
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    err = capsys.readouterr().err
    assert err.count("the inference capture failed") == 1 and "running the model eagerly" in err
