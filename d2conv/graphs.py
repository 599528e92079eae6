"""A model's passes as CUDA graphs: the training forward and backward (``GraphedForward``,
replayed each step) and the inference forward (``GraphedInference``, per clip shape).

A training step of the paper's model launches thousands of small kernels (ir-CSN-152's 150
convolutions, recomputed under checkpointing, and their backward), and Python cannot launch them
as fast as the GPU runs them: in eager mode the GPU waits for the host for a quarter to a half
of the step, by the host's speed (docs/design.md#cuda-graphs). Replaying captured graphs
launches each pass with one call. ``torch.cuda.make_graphed_callables`` does the capture; the
loss, the optimizer and everything data-dependent stay eager.

    forward = GraphedForward(model, first_clip, torch.bfloat16)   # warm-up and capture
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = forward(clip)          # a replay for clips of the captured shape
    loss_fn(logits.float(), target).backward()                    # the backward graph's replay

Inference waits on the host the same way, without the backward (docs/design.md#cuda-graphs).

    forward = GraphedInference(model.eval())      # captures each clip shape on its second call
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = forward(clips)
"""
import contextlib
import sys

import torch
from torch import nn


@contextlib.contextmanager
def _restored_on_failure():
    """A capture that raises leaves the current stream on its side stream and the GPU's random
    generator in capture mode, where any later random draw on it raises (torch.cuda.graph's exit
    raises before undoing either, PyTorch 2.11): both put back as they were, and the error
    raised on."""
    device = torch.cuda.current_device()
    with torch.cuda.stream(torch.cuda.current_stream(device)):   # its exit restores the stream
        try:
            yield
        except BaseException:
            generator = torch.cuda.default_generators[device]
            generator.graphsafe_set_state(generator.clone_state())    # same seed and offset
            raise


class GraphedForward:
    """``model``'s training forward (N, 3, T, H, W) -> logits, captured for clips of ``sample``'s
    shape and dtype; other clips, or the model in eval mode, run eagerly. ``amp``: the autocast
    dtype the model trains in, or None. The model must be on its GPU, in train mode, with the
    parameters that train already requiring gradients; its outputs are overwritten by the next
    call, so a step must be done with them before the next forward.

    Capturing runs three eager forward+backward passes first (make_graphed_callables's warm-up,
    which also compiles and tunes the Triton kernels outside the capture) and one captured, so
    the first call costs about four steps; the model's buffers (the running statistics of
    trainable BatchNorms) are put back as they were before them. The graphs keep their memory (a
    private pool) for the model's lifetime. A model whose forward or backward cannot be captured
    (one that reads a GPU value on the host, say) raises the capture's RuntimeError, the model,
    the current stream and the GPU's random generator left as they were."""

    def __init__(self, model: nn.Module, sample: torch.Tensor, amp=None):
        if not sample.is_cuda or not model.training:
            raise ValueError("GraphedForward captures a CUDA model's training forward: the model "
                             "must be in train mode and the sample clip on its GPU")
        self.model, self.shape, self.dtype = model, sample.shape, sample.dtype
        static = sample.detach().clone()
        buffers = [(b, b.clone()) for b in model.buffers()]
        # autocast's weight cache cannot be captured (make_graphed_callables refuses it)
        autocast = (torch.autocast("cuda", dtype=amp, cache_enabled=False) if amp is not None
                    else contextlib.nullcontext())
        try:
            with _restored_on_failure(), autocast:
                torch.cuda.make_graphed_callables(model, (static,), allow_unused_input=True)
        finally:                    # also after a failed capture: the model as it was
            for buffer, saved in buffers:
                buffer.copy_(saved)
        # make_graphed_callables puts the graphed forward on the model itself; keep it here
        # and give the model back its own (evaluation, other shapes, checkpoints see no change)
        self.replay = model.forward
        del model.forward

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        if clip.shape == self.shape and clip.dtype == self.dtype and self.model.training:
            return self.replay(clip)
        return self.model(clip)


class GraphedInference(nn.Module):
    """``model``'s inference forward (N, 3, T, H, W) -> logits, replayed from CUDA graphs: one
    per input shape, dtype and autocast dtype, captured at that input's second call (the first
    runs eagerly, which compiles and tunes the kernels for it), at most ``max_graphs``, all in
    one memory pool kept for the wrapper's lifetime. Calls with gradients enabled, with the model
    in train mode or on CPU tensors run the model eagerly, as do inputs past ``max_graphs``.
    Each call returns a new tensor. A capture that fails (a forward that reads a GPU value on
    the host, say) says so in one line on stderr, and every later call runs eagerly.

    ``model`` is the wrapper's submodule: its parameters, modes and device are the model's.
    Forward hooks on its layers see eager calls only (``d2conv.evaluation.dilation_maps`` runs
    the model itself)."""

    def __init__(self, model: nn.Module, max_graphs: int = 8):
        super().__init__()
        self.model, self.max_graphs = model, max_graphs
        self.graphs = {}                # key -> (graph, static input, static output)
        self.seen = set()               # keys called once, eagerly
        self.pool = None
        self.failed = False

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if self.failed or self.model.training or torch.is_grad_enabled() or not clips.is_cuda:
            return self.model(clips)
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(clips.shape), clips.dtype, clips.device, amp)
        if key not in self.graphs:
            if key not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(key)
                return self.model(clips)
            captured = self._capture(clips, amp)
            if captured is None:
                return self.model(clips)
            self.graphs[key] = captured
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(clips)
        graph.replay()
        return static_out.clone()

    def _capture(self, clips, amp):
        """(graph, static input, static output) of the model on ``clips``; None on failure."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_in, graph = clips.clone(), torch.cuda.CUDAGraph()
        # autocast's weight cache cannot be captured; "thread_local": threads that decode
        # frames or write masks beside the model may call CUDA while this one captures
        autocast = (torch.autocast("cuda", dtype=amp, cache_enabled=False) if amp is not None
                    else contextlib.nullcontext())
        try:
            with (_restored_on_failure(),
                  torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"),
                  autocast):
                static_out = self.model(static_in)
        except RuntimeError as error:
            self.failed = True
            reason = " ".join(str(error).split())
            print(f"CUDA graphs: the inference capture failed ({reason[:200]}); running the "
                  f"model eagerly", file=sys.stderr, flush=True)
            return None
        return graph, static_in, static_out
