"""Pre-training the denoising models: l-DAE (with its ablations) and the DDPM objective of the DDAE UNets, a job on
the zoo's training engine (``engine``).

``TrainConfig`` adds the model and its ablations to the engine's ``RunConfig``, each field with the reason for it;
``DenoisingObjective`` is what the loop optimises; ``train(config)`` runs it. The l-DAE's PCA tokenizer is fitted as
the first step of a fresh run, on the images the run trains on (the first epoch's order, in memory or streamed: the
same center squares).

    ldae-models train --dataset cifar10 --data-root ~/data --out runs/tiny --epochs 400
    torchrun --nproc_per_node 8 -m ldae_models train --recipe ldae_vit_b_in1k --data-root IMAGENET --out runs/b

The end of a run writes ``model.safetensors`` (the EMA weights with ``ema``) and, for an l-DAE, ``encoder/``, a
``save_pretrained`` folder of its conditional encoder.
"""
import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from ..data import ImageData, Split, normalize, read_batches
from ..engine import Context, Objective, RunConfig, StageResult, Stream, arg, epoch_order, generator, run
from ..layers.pca import LATENT_SCALES
from ..layers.schedules import SCHEDULES, TARGETS, randn
from ..models.ldae_vit import NOISE_SPACES
from .memory import ACTIVATION_MIB, planned_gb

__all__ = ['TrainConfig', 'DenoisingObjective', 'train', 'build_model', 'fit_pca', 'export_final']


@dataclass
class TrainConfig(RunConfig):
    """A denoising run: the l-DAE objective (and its ablations) or the DDPM objective of a DDAE UNet."""

    resume_fields = RunConfig.resume_fields + ('model', 'model_args')

    # -- what to train
    model: str = arg('ldae_vit_tiny_patch4_32', 'an l-DAE size (ldae_vit_*) or a DDAE UNet (ddae_*)')
    model_args: Dict[str, Any] = arg(None, 'constructor overrides as JSON, e.g. {"depth": 6}', factory=dict)
    target: Optional[str] = arg(None, "l-DAE prediction target (default 'image', the final l-DAE; Tab. 3)",
                                 choices=TARGETS)
    noise_space: Optional[str] = arg(None, "where noise is added: 'latent' (l-DAE) or 'pixel' (classical DAE)",
                                      choices=NOISE_SPACES)
    schedule: Optional[str] = arg(None, "noise schedule: 'linear_sigma' (final l-DAE), 'single' (one level), "
                                         "'vp_linear' (input-scaled, Tab. 1/3)",
                                   choices=tuple(SCHEDULES))
    sigma_max: Optional[float] = arg(None, 'sigma at the last step of linear_sigma (the paper: sqrt 2); larger '
                                            'hides more of the image at high t', above=0)
    latent_dim: Optional[int] = arg(None, 'd, the PCA components kept as the latent (Tab. 2)', min=1)
    latent_scale: Optional[str] = arg(None, "latent scale (ours): 'global' (one scale), 'whiten' (per component)",
                                       choices=LATENT_SCALES)
    residual_weight: Optional[float] = arg(None, 'loss weight of the discarded PCA components (the paper: 0.1)', min=0)
    grad_checkpointing: bool = arg(False, 'recompute activations in backward (l-DAE): less memory, more time')
    # -- PCA tokenizer
    pca_images: int = arg(50_000, 'images streamed into the PCA fit (the first step of an l-DAE run)', min=1)
    pca_patches_per_image: Optional[int] = arg(None, 'random patches per image in the fit (default: all)', min=1)
    pca_from: Optional[str] = arg(None, 'take the fitted tokenizer from this checkpoint instead of fitting')

    def model_kwargs(self) -> Dict[str, Any]:
        """The whole model's constructor arguments: ``model_args`` and the l-DAE ablation fields that are set."""
        kw = dict(self.model_args)
        for key in ('target', 'noise_space', 'schedule', 'latent_dim', 'latent_scale', 'residual_weight'):
            value = getattr(self, key)
            if value is not None:
                kw[key] = value
        if self.sigma_max is not None:
            kw['schedule_args'] = {**kw.get('schedule_args', {}), 'sigma_max': self.sigma_max}
        return kw

def build_model(cfg: TrainConfig) -> nn.Module:
    """The whole model a config trains (``models.full_model``): an l-DAE (with the ablations) or a DDAE UNet."""
    from ..models import full_model
    kwargs = cfg.model_kwargs()
    try:
        model = full_model(cfg.model, **kwargs)
    except TypeError as e:
        raise ValueError(f'{cfg.model} does not take these arguments ({sorted(kwargs)}): {e}') from None
    if not hasattr(model, 'training_loss'):
        raise ValueError(f'{cfg.model} has no training objective here (the l-DAE and DDAE UNet families train)')
    return model

class DenoisingObjective(Objective):
    """The model's own ``training_loss`` (l-DAE, DDPM UNet) at t and noise drawn by its schedule; an l-DAE's PCA is
    fitted first (``prepare``), and its encoder is exported last."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.has_tokenizer = hasattr(model, 'tokenizer')  # an l-DAE (the UNets' DAE has no tokenizer)
        self.img_size = int((model.encoder if self.has_tokenizer else model).input_size()[-1])
        with torch.device('meta'):  # the shape of one image's noise, without computing anything
            self.noise_shape = tuple(model.noise_shape(torch.empty(1, 3, self.img_size, self.img_size)))

    @property
    def trained(self) -> nn.Module:
        return self.model

    def prepare(self, data: Union[ImageData, Split], ctx: Context) -> None:
        if not self.has_tokenizer:
            return
        if self.cfg.pca_from:  # the fitted tokenizer of another file
            from ..hub import read_checkpoint, unwrap_state_dict
            ctx.log.stage('pca', source=self.cfg.pca_from)
            sd = unwrap_state_dict(read_checkpoint(self.cfg.pca_from))
            self.model.tokenizer.load_state_dict({k.split('tokenizer.', 1)[1]: v for k, v in sd.items()
                                                  if 'tokenizer.' in k})
            return
        ctx.log.stage('pca', images=min(self.cfg.pca_images, len(data)))
        fit_pca(self.model, data, self.cfg, ctx)

    def draws(self, generator: torch.Generator, batch: int, device: torch.device) -> Dict[str, torch.Tensor]:
        return dict(t=self.model.schedule.sample_t(batch, generator=generator, device=device),
                    noise=randn((batch, *self.noise_shape), generator=generator, device=device))

    def forward(self, images: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model.training_loss(images, t, noise)

    def export(self, trained: nn.Module, out: Path) -> Path:
        return export_final(trained, self.cfg, out)

    def planned_memory_gb(self, micro_batch: int, world: int, ema: bool) -> Optional[float]:
        """The memory plan (``memory.planned_gb``) of this model and micro-batch (None: no measured activation size)."""
        if self.cfg.model not in ACTIVATION_MIB:
            return None
        return planned_gb(self.cfg.model, micro_batch, world, ema, self.cfg.grad_checkpointing)


def fit_pca(model: nn.Module, data: Union[ImageData, Split], cfg: TrainConfig, ctx: Context) -> None:
    """Stream ``pca_images`` images (the first epoch's order, this process's share) into float64 sums; all-reduce;
    fit. The patches sampled per image come from the ``PCA_PATCHES`` stream of this process."""
    n = len(data)
    mine = epoch_order(n, cfg.seed, 0)[:min(cfg.pca_images, n)][ctx.rank::ctx.world]
    stats = model.tokenizer.new_stats()
    g = generator(cfg.seed, Stream.PCA_PATCHES, ctx.rank)
    size = int(model.encoder.input_size()[-1])
    chunks = [mine[i:i + 1024] for i in range(0, len(mine), 1024)]
    bad = 'fill' if cfg.skip_bad_images else 'raise'
    with contextlib.closing(read_batches(data, chunks, size, ctx.device, cfg.workers, len(chunks), bad)) as batches:
        for images, _ in batches:
            model.tokenizer.accumulate(stats, normalize(images), patches_per_image=cfg.pca_patches_per_image,
                                       generator=g)
    stats.all_reduce(device=ctx.device if ctx.device.type == 'cuda' else None)
    model.tokenizer.set_from_stats(stats)


def train(cfg: TrainConfig) -> StageResult:
    """Run a denoising config to its end (or resume it): the last step, the last log record, the weights' path and
    the trained model."""
    def make(num_classes: int) -> Objective:
        model = build_model(cfg)
        if cfg.grad_checkpointing:
            if not hasattr(model, 'set_grad_checkpointing'):
                raise ValueError(f'--grad-checkpointing is not available for {cfg.model}')
            model.set_grad_checkpointing(True)
        return DenoisingObjective(model, cfg)
    return run(cfg, make)


def export_final(model: nn.Module, cfg: TrainConfig, out: Path) -> Path:
    """``model.safetensors`` (the whole model) and, for an l-DAE, ``encoder/``: its conditional encoder, with the
    arguments (schedule and t included) that rebuild it, as a ``save_pretrained`` folder."""
    import timm
    from ..hub.publish import save_pretrained, save_safetensors
    path = save_safetensors(model.state_dict(), out / 'model.safetensors', metadata={'architecture': cfg.model})
    if hasattr(model, 'tokenizer'):
        enc = timm.create_model(cfg.model, pretrained=True, merged=False, pretrained_cfg_overlay=dict(file=str(path)),
                                **model.encoder_args)
        save_pretrained(enc, out / 'encoder', model_card=dict(
            description=f'l-DAE encoder ({cfg.model}) trained with ldae-models train.',
            training={k: v for k, v in dataclasses.asdict(cfg).items() if k not in ('data_root', 'out')}))
    return path
