"""What a training run is: its config (``TrainConfig``), the presets, and the model it builds.

    cfg = make_config("tiny", data="synthetic", epochs=4)     # a preset with overrides
    model = build_model(cfg)                                   # also from a checkpoint's dict

Presets:
- ``tiny``: the CPU default, a narrow ir-CSN trained from scratch on the synthetic set.
- ``small``: the GPU default without backbone weights, a wider ir-CSN from scratch on larger
  synthetic frames.
- ``paper``: the paper's recipe (docs/training.md): ir-CSN-152 from the VMZ weights, fine-tuned
  at lr 1e-5 on DAVIS-2017 train and validated on DAVIS-2016 val.
"""
from dataclasses import MISSING, dataclass, field, fields

from .backbones import BACKBONES
from .model import DECODER_CONVS, EncoderDecoder

__all__ = ["TrainConfig", "FIELDS", "PRESETS", "DESCRIPTIONS", "CHOICES", "make_config",
           "from_dict", "build_model"]


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: str = "synthetic"            # "synthetic" or a DAVIS root
    synthetic: dict = field(default_factory=dict)   # the synthetic set's parameters (overrides
                                       # of d2conv.data.synthetic.DEFAULTS) for data="synthetic"
    run_dir: str = "runs/tiny"
    backbone: str = "ir_csn_tiny"
    backbone_weights: str = ""         # converted VMZ weights (python -m d2conv.weights convert)
    decoder_conv: str = "d2conv-xyz"
    mdim: int = 32
    decoder_norm: bool = False         # GroupNorm after the GC and before the head (from scratch)
    fg_prior: float = 0.0              # > 0: the head's bias starts at this foreground log-odds
    clip_len: int = 8
    replacement: bool = True           # clip frames drawn with replacement (the original's)
    size: tuple = ()                   # resize frames to (H, W) for training; () keeps them
    augment: bool = False              # flips and scale jitter (the original trained without)
    batch_size: int = 4                # clips per process
    lr: float = 1e-3
    predictor_lr: float = 1.0          # lr multiplier of the D²Conv / DCN size, offset and mask
                                       # predictors (zero-initialised, fan-in 27 x Cin)
    warmup_steps: int = 0              # linear lr warm-up over the first optimizer steps
    optimizer: str = "adam"            # adam | adamw
    weight_decay: float = 0.0
    scheduler: str = "step"            # step | cosine
    step_epochs: int = 10
    gamma: float = 0.1
    epochs: int = 20
    max_steps: int = 0                 # stop after this many optimizer steps (0: no limit)
    clip_grad: float = 10.0
    loss: str = "lovasz"               # lovasz | bce | bce+lovasz
    amp: bool = True                   # bf16 autocast on the GPU
    autotune: bool = True              # tune the Triton kernels per shape, once per GPU (the
                                       # picks are kept on disk: kernels/tuning.py); False: their
                                       # default configs
    checkpoint: bool = False           # activation checkpointing of the backbone blocks
    cuda_graphs: bool = True           # on one GPU, the training forward and backward replayed
                                       # as CUDA graphs (d2conv/graphs.py) for clips of the
                                       # first batch's shape; False: eager
    workers: int = 2
    val_every: int = 1                 # epochs
    val_gap: int = 5                   # clip start spacing during validation (the protocol's)
    log_every: int = 10
    seed: int = 0


FIELDS = frozenset(f.name for f in fields(TrainConfig))

PRESETS = {
    # the CPU default, from scratch on the synthetic set. From scratch it needs the decoder's
    # GroupNorms (else the head's ReLU dies and the output collapses to a constant), the head's
    # bias at the foreground prior, a warm-up, a batch of 8 and the sampling predictors at a
    # tenth of the lr, and a backbone with GroupNorm (ir_csn_tiny's docstring). 2-core AMD EPYC,
    # 2026-12-02: validation IoU 0.708 / 0.690 (seeds 0 / 1) after these 6 epochs in 9 minutes;
    # 8 epochs reached 0.699 (bench/results/CPU_2core-default-training.json).
    "tiny": dict(backbone="ir_csn_tiny", mdim=32, decoder_norm=True, fg_prior=0.12, batch_size=8,
                 lr=2e-3, scheduler="cosine", predictor_lr=0.1, warmup_steps=25, epochs=6,
                 loss="bce+lovasz", augment=True, replacement=False, workers=1,
                 checkpoint=False),
    # the GPU default without backbone weights: the same recipe, 3x wider, larger frames (one
    # H200, 2026-12-02: IoU 0.877 in 4.5 minutes, kernels at their default configs)
    "small": dict(backbone="ir_csn_small", mdim=64, decoder_norm=True, fg_prior=0.12,
                  batch_size=8, lr=2e-3, scheduler="cosine", predictor_lr=0.1, warmup_steps=100,
                  epochs=12, loss="bce+lovasz", augment=True, replacement=False, workers=6,
                  checkpoint=False,
                  synthetic=dict(n_train=96, n_val=16, frames=24, height=128, width=224)),
    # the paper's recipe (docs/training.md); backbone weights from the VMZ model zoo
    "paper": dict(backbone="ir_csn_152", mdim=256, batch_size=2, lr=1e-5, epochs=20,
                  step_epochs=10, gamma=0.1, loss="lovasz", size=(480, 854), checkpoint=True,
                  augment=False, replacement=True, workers=4),
}


# what each preset trains and how long its epochs took, for the line train.py prints at the start
DESCRIPTIONS = {
    "tiny": ("ir-CSN-tiny trained from scratch on the synthetic videos at 64x96",
             "9 minutes on 2 CPU cores (AMD EPYC, 2026-12-02)"),
    "small": ("ir-CSN-small trained from scratch on the synthetic videos at 128x224",
              "4.5 minutes on one H200 (2026-12-02), plus about a minute tuning the kernels "
              "in a GPU's first run"),
    "paper": ("the paper's recipe: ir-CSN-152 fine-tuned at lr 1e-5 on DAVIS-2017 train, "
              "validated on DAVIS-2016 val", "about 80 minutes on one H200 at 2 steps/s"),
}


# the fields that name one of a fixed set of things
CHOICES = dict(preset=tuple(PRESETS), backbone=tuple(BACKBONES), decoder_conv=DECODER_CONVS,
               loss=("lovasz", "bce", "bce+lovasz"), optimizer=("adam", "adamw"),
               scheduler=("step", "cosine"))


def make_config(preset, **overrides):
    """The preset's config with ``overrides`` (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(values) - FIELDS
    if unknown:
        raise ValueError(f"unknown config options: {sorted(unknown)}")
    return checked(TrainConfig(preset=preset, **values))


def from_dict(values: dict) -> TrainConfig:
    """A checkpoint's config dict as a TrainConfig (fields it lacks, from an older checkpoint,
    take their defaults; fields this version no longer has are dropped); ValueError naming the
    first field of the wrong type or outside its CHOICES."""
    return checked(TrainConfig(**{k: v for k, v in values.items() if k in FIELDS}))


def checked(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` once each field has its default's type (an int where a float goes; a list where a
    tuple goes becomes one) and each CHOICES field is one of its choices; ValueError otherwise."""
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        kind = type(f.default_factory() if f.default is MISSING else f.default)
        if kind is tuple and isinstance(value, list):
            value = tuple(value)
            setattr(cfg, f.name, value)
        fits = (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
                or kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not fits:
            raise ValueError(f"{f.name} must be a {kind.__name__}, got {value!r}")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ValueError(f"{f.name} must be one of {list(CHOICES[f.name])}, got {value!r}")
    return cfg


def build_model(cfg):
    """The EncoderDecoder a config describes: a TrainConfig, or the dict a checkpoint stores.
    Trainer and evaluate.py both build through here, so a new model option cannot be forgotten
    by one of them."""
    if isinstance(cfg, dict):
        cfg = from_dict(cfg)
    return EncoderDecoder(cfg.backbone, cfg.decoder_conv, mdim=cfg.mdim,
                          checkpoint=cfg.checkpoint, decoder_norm=cfg.decoder_norm,
                          fg_prior=cfg.fg_prior or None)
