"""MAE's linear probe (``main_linprobe.py``) as a job on the zoo's training engine: a frozen encoder, MAE's head
(``BatchNorm1d(affine=False)`` + ``Linear``) trained on augmented images, then its top-1 on the test split.

The recipe is MAE's: a random resized crop (area 0.08-1) and flip of every image every epoch, LARS (momentum 0.9,
trust coefficient 0.001 on the weight matrix only, no weight decay), lr = blr x batch / 256 with blr 0.1 and batch
16384 (accumulated from ``--micro-batch`` images per forward pass), 10 warmup epochs then cosine, 90 epochs; the
encoder's features computed under bf16 autocast on a GPU, as MAE's. As a run of the engine it resumes exactly,
stops at a scheduler's notice with a checkpoint, and runs on any number of processes (each takes its share of every
global batch; the head's gradients are averaged; BatchNorm per process, as in MAE).

    ldae-models linprobe --model ldae_vit_tiny_patch4_32.cifar10 --dataset cifar10 --data-root ~/data --out runs/lp
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine import Objective, RunConfig, Session, Stream, arg, generator
from ..models.extractor import as_extractor
from ..probe import LinearProbeHead, classifier_top1

__all__ = ['LinProbeConfig', 'LinearProbe', 'linprobe']


@dataclass
class LinProbeConfig(RunConfig):
    """MAE's linear probe of a frozen encoder (the defaults are MAE's recipe)."""

    resume_fields = RunConfig.resume_fields + ('model', 'model_args', 'layer', 't')

    model: str = arg('', 'the encoder: NAME.TAG, local-dir:PATH or hf-hub:ORG/NAME (frozen)')
    model_args: Dict[str, Any] = arg(None, 'constructor overrides as JSON, e.g. {"depth": 6}', factory=dict)
    checkpoint: Optional[str] = arg(None, 'your own weights file for the architecture (any layout it reads)')
    layer: int = arg(-1, 'the probed block (0-based; -1: the last)')
    t: Optional[float] = arg(None, "the encoder's t (default: the one it was trained for)")
    noisy_input: bool = arg(False, "noise the input at t (the paper's \"noisy input\")")
    # MAE's recipe
    epochs: int = arg(90, 'epochs (MAE: 90 for ViT-B, 50 for ViT-L / H)', min=1)
    warmup_epochs: float = arg(10, 'linear warmup epochs, then half-cycle cosine (MAE: 10)', min=0)
    batch_size: int = arg(16384, 'global batch (MAE: 16384), accumulated over --micro-batch images', min=1)
    blr: float = arg(0.1, 'base lr: lr = blr * batch / 256 (MAE: 0.1)', min=0)
    opt: str = arg('lars', "optimizer (MAE: 'lars', its trust ratio on the weight matrix only)")
    weight_decay: float = arg(0.0, 'weight decay (MAE: none)', min=0)
    aug: str = arg('rrc', "augmentation (MAE: 'rrc', a random resized crop and flip)")
    rrc_scale: List[float] = arg(None, "the crop's area range (MAE's probe: 0.08 1)", factory=lambda: [0.08, 1.0])
    ckpt_every: int = arg(500, 'steps between checkpoints (also at the end)', min=1)
    log_every: int = arg(20, 'steps between JSON log lines', min=1)


class LinearProbe(Objective):
    """The head on a frozen encoder's pooled feature at (``layer``, ``t``); the encoder stays in eval mode."""

    def __init__(self, encoder: nn.Module, cfg: LinProbeConfig, num_classes: int) -> None:
        super().__init__()
        self.encoder, self.cfg = encoder.eval().requires_grad_(False), cfg
        self.extractor = as_extractor(encoder)
        pcfg = dict(getattr(encoder, 'pretrained_cfg', None) or {})
        self.mean, self.std = tuple(pcfg.get('mean', (0.5,) * 3)), tuple(pcfg.get('std', (0.5,) * 3))
        self.img_size = int(pcfg['input_size'][-1])
        self.layer = self.extractor.resolve_layers(cfg.layer)[1][0]
        self.t = self.extractor.resolve_ts([cfg.t])[0]
        self.step = 0
        with torch.no_grad():
            dim = self.features(torch.zeros(2, 3, self.img_size, self.img_size)).shape[1]
        self.head = LinearProbeHead(dim, num_classes)

    def train(self, mode: bool = True) -> 'LinearProbe':
        super().train(mode)
        self.encoder.eval()  # frozen: its norms and dropout in eval mode always
        return self

    @property
    def trained(self) -> nn.Module:
        return self.head

    def begin_step(self, step: int, total_steps: int) -> None:
        self.step = step

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled feature (B, C); the noise of ``noisy_input`` seeded by (seed, step, process)."""
        gen = None
        if self.cfg.noisy_input:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            gen = generator(self.cfg.seed, Stream.EVAL_NOISE, self.step, rank, device=x.device)
        feats = self.extractor.extract_features(x, layers=[self.layer], ts=[self.t], noisy_input=self.cfg.noisy_input,
                                                generator=gen)
        return feats[(self.layer, self.t)]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.features(images).float()), labels)

    def classify(self) -> nn.Module:
        """The probed encoder as a classifier of normalised images (for the test split)."""
        return _Classifier(self)

    def export(self, trained: nn.Module, out: Path) -> Path:
        from ..hub.publish import save_safetensors
        return save_safetensors(trained.state_dict(), out / 'head.safetensors',
                                metadata={'model': self.cfg.model, 'layer': str(self.layer), 't': str(self.t)})


class _Classifier(nn.Module):
    def __init__(self, probe: LinearProbe) -> None:
        super().__init__()
        self.probe = probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe.head(self.probe.features(x).float())


def load_encoder(cfg: LinProbeConfig) -> nn.Module:
    """The encoder a config names (conditional where the family has both forms: t is the probe's)."""
    from ..models import load_model
    if not cfg.model:
        raise ValueError('--model is required (the encoder to probe)')
    kwargs = dict(cfg.model_args)
    if cfg.t is not None:
        kwargs['t'] = cfg.t
    try:
        return load_model(cfg.model, checkpoint=cfg.checkpoint, merged=False, **kwargs).eval()
    except TypeError as e:  # a family without a merged form (the UNets), or a plain timm model
        if 'merged' not in str(e):
            raise
        return load_model(cfg.model, checkpoint=cfg.checkpoint, **kwargs).eval()


def linprobe(cfg: LinProbeConfig, encoder: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Train the head (resumable), then its top-1 on the test split. Returns the result (also ``OUT/result.json``)."""
    from ..data import check_data_root, open_split
    check_data_root(cfg.dataset, cfg.data_root, ('train', 'test'), cfg.download)
    encoder = encoder if encoder is not None else load_encoder(cfg)
    with Session(cfg) as session:
        probes: List[LinearProbe] = []

        def make(num_classes: int) -> LinearProbe:
            probes.append(LinearProbe(encoder, cfg, num_classes))
            return probes[-1]
        r = session.stage(cfg, make)
        probe = probes[-1]
        probe.head.load_state_dict(r.trained.state_dict())  # the EMA weights, when there is an EMA
        test = open_split(cfg.dataset, cfg.data_root, 'test', download=cfg.download)
        top1 = classifier_top1(probe.classify().eval(), test, probe.img_size, session.device, probe.mean, probe.std,
                               rank=session.rank, world=session.world, workers=cfg.workers,
                               progress=session.rank == 0 and not cfg.quiet, batch_size=cfg.batch_size // session.world
                               // cfg.accum_steps)
        result = dict(model=cfg.model, layer=probe.layer, t=probe.t, top1=top1, epochs=cfg.epochs, steps=r.step,
                      batch_size=cfg.batch_size, lr=cfg.lr or cfg.blr * cfg.batch_size / 256, processes=session.world,
                      n_test=len(test), head=str(r.weights))
        if session.rank == 0:
            (Path(cfg.out) / 'result.json').write_text(json.dumps(result, indent=1) + '\n')
    return result
