"""The training forward and backward of a model as two CUDA graphs, replayed each step.

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
"""
import contextlib

import torch
from torch import nn


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
    (one that reads a GPU value on the host, say) raises the capture's RuntimeError, the model
    left as it was."""

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
            with autocast:
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
