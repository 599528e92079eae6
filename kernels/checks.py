"""Argument checking shared by the reference and the Triton path (never imports Triton).

Every failure raises ``ValueError`` naming the offending argument.
"""
from dataclasses import dataclass

import torch

# D²Conv modes (docs/operators.md): which size channel scales the t, y and x axis (None: scale 1)
SIZE_AXES = {"x": (None, 0, 0), "xy": (None, 0, 1), "xxz": (0, 1, 1), "xyz": (0, 1, 2)}
# number of size channels per offset group, by mode
SIZE_CHANNELS = {mode: 1 + max(axes[1:]) for mode, axes in SIZE_AXES.items()}
# free-offset modes: which component of a kernel point's offset moves the t, y and x axis (None:
# not moved). "offset": (t, y, x) triples (deform_conv3d); "offset_yx": (y, x) pairs, the 2D ops
# at T = 1 (deform_conv2d, torchvision's layout)
OFFSET_AXES = {"offset": (0, 1, 2), "offset_yx": (None, 0, 1)}
OFFSET_COMPONENTS = {mode: 1 + axes[2] for mode, axes in OFFSET_AXES.items()}


def ntuple(value, name, n):
    """int or n-sequence -> tuple of n ints; a ValueError naming ``name`` otherwise."""
    if isinstance(value, int):
        return (value,) * n
    if not isinstance(value, (tuple, list, torch.Size)):
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    value = tuple(value)
    if len(value) != n or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    return value


def triple(value, name):
    """int or 3-sequence -> tuple of 3 ints."""
    return ntuple(value, name, 3)


def conv_triples(stride, padding, dilation, spatial=3):
    """(stride, padding, dilation) as (t, h, w) triples, each checked: positive stride and
    dilation, non-negative padding. ``spatial``: as in check_args."""
    stride, padding, dilation = (triple(stride, "stride"), triple(padding, "padding"),
                                 triple(dilation, "dilation"))
    axes = _axes(spatial)
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {axes(stride)}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be positive, got {axes(dilation)}")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {axes(padding)}")
    return stride, padding, dilation


def _axes(spatial):
    """How a message shows an axis triple (t, h, w): whole for a 3D call; (h, w) for a 2D call,
    which runs at T = 1."""
    return tuple if spatial == 3 else lambda triple: tuple(triple)[1:]


def _shape(spatial):
    """How a message shows a 5-D shape (N, C, T, H, W): whole for a 3D call, (N, C, H, W) for a
    2D call."""
    return tuple if spatial == 3 else lambda shape: tuple(shape)[:2] + tuple(shape)[3:]


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes of one deformable 3D convolution call (all derived from the arguments)."""

    N: int
    C: int
    T: int
    H: int
    W: int
    Co: int
    kernel: tuple      # (kd, kh, kw)
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    offset_groups: int
    out: tuple         # (To, Ho, Wo)

    @property
    def K(self):
        kd, kh, kw = self.kernel
        return kd * kh * kw


def output_size(in_size, kernel, stride, padding, dilation):
    """(To, Ho, Wo): the output size of a convolution with these kernel, stride, padding and
    dilation."""
    return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1
                 for i, k, s, p, d in zip(in_size, kernel, stride, padding, dilation))


def _check_tensor(t, name, ndim, ref):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if ref is not None:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but input is on {ref.device}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but input has dtype {ref.dtype}")


def check_args(input, coords, weight, bias, stride, padding, dilation, mask, groups, mode,
               spatial=3):
    """Validate a call and return its ConvGeometry.

    ``coords`` is the offset tensor in a free-offset mode (OFFSET_AXES), else the size map of
    that D²Conv mode. ``spatial`` = 2: the 5-D tensors are views of a 2D call's (T = 1), and
    messages show its shapes and (h, w) pairs.
    """
    coords_name = "offset" if mode in OFFSET_AXES else "size"
    if mode not in OFFSET_AXES and mode not in SIZE_CHANNELS:
        raise ValueError(f"mode must be one of {sorted(SIZE_CHANNELS)}, got {mode!r}")
    _check_tensor(input, "input", 5, None)
    if not input.dtype.is_floating_point:
        raise ValueError(f"input must be floating point, got {input.dtype}")
    _check_tensor(weight, "weight", 5, input)
    _check_tensor(coords, coords_name, 5, input)
    if bias is not None:
        _check_tensor(bias, "bias", 1, input)
    if mask is not None:
        _check_tensor(mask, "mask", 5, input)
    stride, padding, dilation = conv_triples(stride, padding, dilation, spatial)
    axes, shape = _axes(spatial), _shape(spatial)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")

    N, C, T, H, W = input.shape
    Co, Cg, kd, kh, kw = weight.shape
    if C % groups:
        raise ValueError(f"input has {C} channels, not divisible by groups={groups}")
    if Co % groups:
        raise ValueError(f"weight has {Co} output channels, not divisible by groups={groups}")
    if Cg != C // groups:
        raise ValueError(f"weight expects {Cg} input channels per group, input gives "
                         f"{C} channels / groups={groups} = {C // groups}")
    if min(kd, kh, kw) < 1:
        raise ValueError(f"weight has an empty kernel {axes(weight.shape[2:])}")
    if bias is not None and bias.shape[0] != Co:
        raise ValueError(f"bias has {bias.shape[0]} elements, weight has {Co} output channels")
    out = output_size((T, H, W), (kd, kh, kw), stride, padding, dilation)
    if min(out) < 1:
        raise ValueError(f"input spatial size {axes((T, H, W))} is too small for kernel "
                         f"{axes((kd, kh, kw))} with padding {axes(padding)} and dilation "
                         f"{axes(dilation)}")
    K = kd * kh * kw
    dims = "output T, H, W" if spatial == 3 else "output H, W"

    if mode in OFFSET_AXES:
        per_group = OFFSET_COMPONENTS[mode] * K
        what = f"{OFFSET_COMPONENTS[mode]} x kernel points"
    else:
        per_group = SIZE_CHANNELS[mode]
        what = f"{per_group} for mode {mode!r}"
    if coords.shape[1] == 0 or coords.shape[1] % per_group:
        raise ValueError(f"{coords_name} has {coords.shape[1]} channels, expected a positive "
                         f"multiple of {per_group} (offset groups x {what})")
    G = coords.shape[1] // per_group
    if C % G:
        raise ValueError(f"{coords_name} implies {G} offset groups, which do not divide "
                         f"the {C} input channels")
    expected = (N, coords.shape[1]) + out
    if tuple(coords.shape) != expected:
        raise ValueError(f"{coords_name} has shape {shape(coords.shape)}, expected "
                         f"{shape(expected)} (batch, channels, {dims})")
    if mask is not None:
        expected = (N, G * K) + out
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask has shape {shape(mask.shape)}, expected {shape(expected)} "
                             f"(batch, offset groups x kernel points, {dims})")
    return ConvGeometry(N, C, T, H, W, Co, (kd, kh, kw), stride, padding, dilation, groups, G, out)


_GEOMETRIES = {}     # call signature -> ConvGeometry, for checked_geometry


def _signature(t):
    return None if t is None else (t.shape, t.dtype, t.device)


def checked_geometry(input, coords, weight, bias, stride, padding, dilation, mask, groups, mode,
                     spatial=3):
    """``check_args``, remembered per call signature (the tensors' shapes, dtypes and devices and
    the other arguments, as written): a repeated call skips the checks (6 µs of the host's time a
    call on a 2-core AMD EPYC). Arguments that are not tensors are checked every time."""
    try:
        # repr: 1.0 == 1 and True == 1, but check_args refuses a float stride
        key = (*map(_signature, (input, coords, weight, bias, mask)),
               repr((stride, padding, dilation, groups, mode)), spatial)
        geo = _GEOMETRIES.get(key)
    except AttributeError:                           # not a tensor
        return check_args(input, coords, weight, bias, stride, padding, dilation, mask, groups,
                          mode, spatial)
    if geo is None:
        geo = check_args(input, coords, weight, bias, stride, padding, dilation, mask, groups,
                         mode, spatial)
        if len(_GEOMETRIES) < 4096:
            _GEOMETRIES[key] = geo
    return geo


def check_group_norm(input, num_groups, weight, bias, eps, input_bias=None):
    """Validate a ``group_norm`` call (``F.group_norm``'s arguments and the input bias)."""
    if not isinstance(input, torch.Tensor):
        raise ValueError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"input must be (N, C, ...), got shape {tuple(input.shape)}")
    if not input.dtype.is_floating_point:
        raise ValueError(f"input must be floating point, got {input.dtype}")
    C = input.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing the input's {C} channels, "
                         f"got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias), ("input_bias", input_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape ({C},), got {shape}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")


def check_upsample_add(input, source):
    """Validate an ``upsample_add`` call: two non-empty 5-D float tensors of the same N and C on
    one device."""
    for name, t in (("input", input), ("source", source)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 5 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty (N, C, T, H, W) tensor, got shape "
                             f"{tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if source.shape[:2] != input.shape[:2]:
        raise ValueError(f"source must have the input's (N, C) = {tuple(input.shape[:2])}, got "
                         f"{tuple(source.shape[:2])}")
    if source.device != input.device:
        raise ValueError(f"source is on {source.device} but input is on {input.device}")


# the largest depthwise kernel extent per axis the Triton kernels take
DEPTHWISE_MAX_KERNEL = 7


@dataclass(frozen=True)
class DepthwiseGeometry:
    """Shapes of one depthwise 3D convolution call (groups = channels, one output channel each)."""

    N: int
    C: int
    T: int
    H: int
    W: int
    kernel: tuple      # (kd, kh, kw)
    stride: tuple
    padding: tuple
    dilation: tuple
    out: tuple         # (To, Ho, Wo)


def check_depthwise(input, weight, bias, stride, padding, dilation):
    """Validate a ``depthwise_conv3d`` call and return its DepthwiseGeometry."""
    _check_tensor(input, "input", 5, None)
    if not input.dtype.is_floating_point:
        raise ValueError(f"input must be floating point, got {input.dtype}")
    _check_tensor(weight, "weight", 5, input)
    if bias is not None:
        _check_tensor(bias, "bias", 1, input)
    stride, padding, dilation = conv_triples(stride, padding, dilation)
    N, C, T, H, W = input.shape
    kernel = tuple(weight.shape[2:])
    if weight.shape[:2] != (C, 1):
        raise ValueError(f"weight must be (C, 1, kd, kh, kw) with C = {C} (the input's "
                         f"channels), got {tuple(weight.shape)}")
    if min(kernel) < 1 or max(kernel) > DEPTHWISE_MAX_KERNEL:
        raise ValueError(f"weight's kernel {kernel} must be 1 to {DEPTHWISE_MAX_KERNEL} per axis")
    if bias is not None and bias.shape[0] != C:
        raise ValueError(f"bias has {bias.shape[0]} elements, the input has {C} channels")
    out = output_size((T, H, W), kernel, stride, padding, dilation)
    if min(out) < 1:
        raise ValueError(f"input spatial size {(T, H, W)} is too small for kernel {kernel} "
                         f"with padding {padding} and dilation {dilation}")
    return DepthwiseGeometry(N, C, T, H, W, kernel, stride, padding, dilation, out)
