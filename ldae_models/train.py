"""Training: the zoo's one training loop, and the denoising objectives it runs (l-DAE and its ablations, the DDPM
objective of the DDAE UNets).

``RunConfig`` holds what every run shares (data, budget and optimiser, precision, the run's folder and seed),
``TrainConfig`` adds the denoising model and its ablations, each field with the reason for it. ``run(config,
make_objective)`` is the loop, in one process on a CPU or GPU or under torchrun on any number of GPUs
(DistributedDataParallel); an ``Objective`` says what it optimises. ``train(config)`` runs a ``DenoisingObjective``;
``ldae_models.distill`` (RepFusion) runs its own objective through the same loop. The command line (``ldae-models
train``, ``ldae-models distill``) and the benchmarks build the configs; nothing else reads arguments.

    ldae-models train --dataset cifar10 --data-root ~/data --out runs/tiny --epochs 400
    torchrun --nproc_per_node 8 -m ldae_models train --model ldae_vit_base_patch16_256 --data-root IMAGENET ...

What makes it fast and exact:

- Data that fits in memory (CIFAR-10: 150 MB) is decoded once into a uint8 tensor on the device; a step cuts its
  batch out of it and augments on the device. Larger ImageFolders stream through a DataLoader (``in_memory='no'``).
- Every random draw of a step (the data order of its epoch, its crops, its t and noise) comes from seeds of (``seed``,
  epoch or step), drawn for the whole global batch on the device; a rank takes its slice. So a run resumed from a
  checkpoint ends in exactly the state of an uninterrupted run, and N processes give the model of one process with
  the same global batch (up to the order of floating-point sums). Nothing waits on the host per sample.
- The step never waits for the device either: the loss is read at log steps, and the non-finite check every
  ``nan_check_every`` steps and before every checkpoint. A non-finite loss stops the run with a message naming the
  step; the last good checkpoint is kept.
- bf16 autocast on a GPU (the PCA tokenizer and the loss stay float32), fused AdamW, fused attention (timm's),
  optional ``torch.compile``.

Checkpoints (``ckpt_last.pth``) are written atomically and hold only tensors and plain containers
(``torch.load(weights_only=True)``). The end of a run writes ``model.safetensors`` (the EMA weights with ``ema``) and,
for an l-DAE, ``encoder/``, a ``save_pretrained`` folder of its conditional encoder.
"""
import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .data import DATASETS, ImageData, augment, load_split, normalize
from .layers.schedules import randn

__all__ = ['RunConfig', 'TrainConfig', 'Objective', 'DenoisingObjective', 'run', 'train', 'process_group', 'build_model', 'lr_at',
           'CKPT_NAME', 'cpu_has_native_bf16', 'step_seed', 'Preempted', 'PREEMPTED_EXIT_CODE']

CKPT_NAME = 'ckpt_last.pth'
PREEMPTED_EXIT_CODE = 75  # what the command line exits with after a SIGTERM / SIGUSR1 checkpoint (EX_TEMPFAIL: requeue)
_MASK = (1 << 63) - 1


def _arg(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its reason (the command line's help)."""
    factory = kw.pop('factory', None)
    if factory is not None:
        return field(default_factory=factory, metadata=dict(help=help, **kw))
    return field(default=default, metadata=dict(help=help, **kw))


def check_bounds(cfg: Any) -> None:
    """Refuse a field outside the bounds its metadata states (``min``, ``above``, ``below``), naming its flag."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or isinstance(value, (bool, str, dict)) or not any(k in meta for k in ('min', 'above', 'below')):
            continue
        flag = '--' + f.name.replace('_', '-')
        if 'min' in meta and not value >= meta['min']:
            raise ValueError(f'{flag} must be >= {meta["min"]}, got {value}')
        if 'above' in meta and not value > meta['above']:
            raise ValueError(f'{flag} must be > {meta["above"]}, got {value}')
        if 'below' in meta and not value < meta['below']:
            raise ValueError(f'{flag} must be < {meta["below"]}, got {value}')


@dataclass
class RunConfig:
    """What every training run of the zoo shares (``ldae-models train`` and ``ldae-models distill``): data, budget and
    optimiser, precision, the run's folder, seed and checkpoints. ``vars`` of a run's config is stored in every
    checkpoint."""

    # -- data
    dataset: str = _arg('folder', "'folder' (an ImageFolder), 'cifar10' (torchvision's files), 'npz'",
                        choices=DATASETS)
    data_root: str = _arg('', 'the folder or file of the data set (ImageFolder root: its train/ is used)')
    download: bool = _arg(False, 'download the data set where the network allows (cifar10)')
    in_memory: str = _arg('auto', "decode the data set once into device memory: 'auto' (every kind but a folder of "
                                  "more than 200,000 images), 'yes', 'no' (stream with a DataLoader)",
                          choices=('auto', 'yes', 'no'))
    aug: str = _arg('center', "'center' crop (the paper's default) or 'rrc' (random resized crop + flip)",
                    choices=('center', 'rrc'))
    workers: int = _arg(4, 'DataLoader workers of the streaming path', min=0)
    # -- budget and optimiser (App. A: AdamW, no weight decay, blr 1e-4, batch 2048, warmup 100 of 400 epochs)
    epochs: int = _arg(400, 'epochs of the schedule (the paper: 400, 800, 1600)', min=0)
    max_steps: int = _arg(0, 'end after this many steps instead; warmup and cosine are then laid over these steps (0: no '
                                'step limit, the epochs decide)', min=0)
    batch_size: int = _arg(2048, 'global batch (the paper: 2048)', min=1)
    accum_steps: int = _arg(1, 'micro-batches per step (gradient accumulation) when the batch does not fit', min=1)
    blr: float = _arg(1e-4, 'base lr: lr = blr * batch / 256 (the paper)', min=0)
    lr: float = _arg(0.0, 'absolute peak lr (overrides blr; 0: from blr)', min=0)
    warmup_epochs: float = _arg(100, 'linear warmup (the paper: 100 of 400 epochs), then half-cycle cosine to 0', min=0)
    opt: str = _arg('adamw', "optimizer, by its name in timm's create_optimizer_v2 ('adamw', 'sgd', 'lars', 'lamb', ...); "
                           "weight decay spares 1-D parameters and each model's no_weight_decay()")
    momentum: float = _arg(0.9, 'momentum of the SGD-family optimizers (sgd, lars, ...)', min=0, below=1)
    weight_decay: float = _arg(0.0, 'weight decay (the paper: none)', min=0)
    clip_grad: float = _arg(0.0, 'gradient-norm clip (0: off)', min=0)
    ema: float = _arg(0.0, 'EMA decay of the weights, e.g. 0.9999 (0: off); the final weights are the EMA', min=0,
                      below=1)
    # -- precision and speed
    amp: str = _arg('auto', "bf16 autocast: 'auto' (on a GPU, and on a CPU with AVX512-BF16 or AMX), 'bf16', 'off'",
                    choices=('auto', 'bf16', 'off'))
    compile: bool = _arg(False, 'torch.compile the training step')
    nan_check_every: int = _arg(25, 'steps between reads of the non-finite-loss flag (each read waits on the device)',
                                min=1)
    device: str = _arg('auto', "'auto' (the local GPU if any), 'cpu', 'cuda'", choices=('auto', 'cpu', 'cuda'))
    # -- the run
    out: str = _arg('', 'output folder: checkpoints, log.jsonl, final weights')
    seed: int = _arg(0, 'the seed of every random draw of the run')
    resume: bool = _arg(False, 'continue from OUT/ckpt_last.pth when it exists')
    allow_config_change: bool = _arg(False, 'resume even where the model, batch, schedule length or seed differ from '
                                            "the checkpoint's (refused otherwise)")
    ckpt_every: int = _arg(1000, 'steps between checkpoints (also at the end)', min=1)
    keep_last: int = _arg(1, 'checkpoints kept: the newest (ckpt_last.pth) and the k - 1 before it '
                             '(ckpt_step*.pth)', min=1)
    keep_every_epochs: int = _arg(0, 'also keep the checkpoint of every N-th epoch (ckpt_epoch*.pth; 0: none)', min=0)
    log_every: int = _arg(50, 'steps between JSON log lines', min=1)
    quiet: bool = _arg(False, 'no progress bar')
    sources: Dict[str, str] = _arg(None, 'where each value comes from (set by a recipe; saved with the run)',
                                   factory=dict, cli=False)

    # what a resumed run must share with its checkpoint (besides the schedule's length in steps)
    resume_fields = ('batch_size', 'seed', 'opt')

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass
class TrainConfig(RunConfig):
    """A denoising run: the l-DAE objective (and its ablations) or the DDPM objective of a DDAE UNet."""

    resume_fields = RunConfig.resume_fields + ('model', 'model_args')

    # -- what to train
    model: str = _arg('ldae_vit_tiny_patch4_32', 'an l-DAE size (ldae_vit_*) or a DDAE UNet (ddae_*)')
    model_args: Dict[str, Any] = _arg(None, 'constructor overrides as JSON, e.g. {"depth": 6}', factory=dict)
    target: Optional[str] = _arg(None, "l-DAE prediction target (default 'image', the final l-DAE; Tab. 3)",
                                 choices=('image', 'latent', 'noise'))
    noise_space: Optional[str] = _arg(None, "where noise is added: 'latent' (l-DAE) or 'pixel' (classical DAE)",
                                      choices=('latent', 'pixel'))
    schedule: Optional[str] = _arg(None, "noise schedule: 'linear_sigma' (final l-DAE), 'single' (one level), "
                                         "'vp_linear' (input-scaled, Tab. 1/3)",
                                   choices=('linear_sigma', 'single', 'vp_linear'))
    sigma_max: Optional[float] = _arg(None, 'sigma at the last step of linear_sigma (the paper: sqrt 2); larger '
                                            'hides more of the image at high t', above=0)
    latent_dim: Optional[int] = _arg(None, 'd, the PCA components kept as the latent (Tab. 2)', min=1)
    latent_scale: Optional[str] = _arg(None, "latent scale (ours): 'global' (one scale), 'whiten' (per component)",
                                       choices=('global', 'whiten', 'none'))
    residual_weight: Optional[float] = _arg(None, 'loss weight of the discarded PCA components (the paper: 0.1)', min=0)
    grad_checkpointing: bool = _arg(False, 'recompute activations in backward (l-DAE): less memory, more time')
    # -- PCA tokenizer
    pca_images: int = _arg(50_000, 'images streamed into the PCA fit (the first step of an l-DAE run)', min=1)
    pca_patches_per_image: Optional[int] = _arg(None, 'random patches per image in the fit (default: all)', min=1)
    pca_from: Optional[str] = _arg(None, 'take the fitted tokenizer from this checkpoint instead of fitting')

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


def step_seed(seed: int, *counters: int) -> int:
    """A 63-bit seed from (run seed, counters...) by splitmix64-style mixing: the counter-based seed of a step."""
    x = seed & _MASK
    for i, c in enumerate(counters):
        x = (x + (c + 1) * (0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019 * i)) & ((1 << 64) - 1)
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
        x ^= x >> 31
    return x & _MASK


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 autocast is many times slower."""
    for probe in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except Exception:  # noqa: BLE001 -- a private probe that changed: fall back to cpuinfo
                break
    try:
        flags = Path('/proc/cpuinfo').read_text()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float = 0.0) -> float:
    """Linear warmup, then half-cycle cosine (the paper's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def no_weight_decay_names(model: nn.Module) -> Set[str]:
    """The parameters a model and every module inside it name in ``no_weight_decay()`` (position embeddings, class
    tokens, ...), as full names: a student inside RepFusion's parts keeps its exemptions."""
    names: Set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, 'no_weight_decay', None)
        if callable(fn):
            names |= {f'{prefix}.{n}' if prefix else n for n in fn()}
    return names


def build_optimizer(model: nn.Module, cfg: 'RunConfig', lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer, built by timm (``create_optimizer_v2``): weight decay in one group, and none on 1-D
    parameters (norms, biases) and on what ``no_weight_decay()`` names; frozen parameters left out. AdamW-family
    optimizers take betas (0.9, 0.95) (ours: MAE's; the l-DAE paper states none), fused on a GPU."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    kw: Dict[str, Any] = {}
    if cfg.opt.lower() in ('adamw', 'adam', 'nadamw', 'lamb', 'adan'):
        kw['betas'] = (0.9, 0.95)
    if cfg.opt.lower() in ('adamw', 'adam') and device.type == 'cuda':
        kw['fused'] = True
    try:
        return create_optimizer_v2(groups, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                   **kw)
    except (AssertionError, ValueError) as e:  # timm's refusal of an unknown name
        raise ValueError(f'--opt {cfg.opt!r}: {e}; timm.optim.list_optimizers() lists the names') from None


# -- model and objective ----------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig) -> nn.Module:
    """The whole model a config trains (``models.full_model``): an l-DAE (with the ablations) or a DDAE UNet."""
    from .models import full_model
    kwargs = cfg.model_kwargs()
    try:
        model = full_model(cfg.model, **kwargs)
    except TypeError as e:
        raise ValueError(f'{cfg.model} does not take these arguments ({sorted(kwargs)}): {e}') from None
    if not hasattr(model, 'training_loss'):
        raise ValueError(f'{cfg.model} has no training objective here (the l-DAE and DDAE UNet families train)')
    return model


class Objective(nn.Module):
    """What a run optimises, as a module the loop wraps (DistributedDataParallel, torch.compile).

    The loop (``run``) owns data, randomness, optimiser, precision, checkpoints and logging; an objective says:

    - ``trained``: the module whose weights are optimised, checkpointed, averaged (EMA) and exported;
    - ``img_size``: the side of the square images it takes;
    - ``build(num_classes)``: told the data's number of classes once it is loaded (a supervised student's head);
    - ``prepare(cfg, data, folder, rank, world, device)``: once, at the start of a fresh run (l-DAE: the PCA fit),
      logged as the stage ``prepare_stage(n)`` names;
    - ``draws(generator, batch, x)``: the random draws of a step for the whole global batch (``batch`` rows), from the
      step's generator on the device; each micro-batch gets its rows;
    - ``forward(x, y, **draws)``: the loss of a micro-batch (images in [-1, 1], labels, its rows of the draws);
    - ``begin_step(step, steps_per_epoch)``: told before each step (schedules inside the objective);
    - ``log_record()``: extra numbers for a log line (read only at log steps);
    - ``export(trained, cfg, out)``: the final files; returns the main one;
    - ``unused_parameters``: True when some trained parameters may take no part in a step's loss (a student's
      classifier while it is distilled): DistributedDataParallel must then look for them each step.
    """

    img_size: int = 0
    unused_parameters: bool = False

    @property
    def trained(self) -> nn.Module:
        raise NotImplementedError

    def build(self, num_classes: int) -> None:
        """Told the data's number of classes once the data is loaded, before the optimiser is made."""

    def prepare_stage(self, n: int) -> Optional[Tuple[str, Dict[str, Any]]]:
        """The log stage (name, info) of ``prepare`` on ``n`` images, if it does any work."""
        return None

    def prepare(self, cfg: RunConfig, data: Optional[ImageData], folder: Any, rank: int, world: int,
                device: torch.device) -> None:
        pass

    def draws(self, generator: torch.Generator, batch: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {}

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        pass

    def log_record(self) -> Dict[str, Any]:
        return {}

    def export(self, trained: nn.Module, cfg: RunConfig, out: Path) -> Path:
        raise NotImplementedError


class DenoisingObjective(Objective):
    """The model's own ``training_loss`` (l-DAE, DDPM UNet) at t and noise drawn by its schedule."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.is_dae = hasattr(model, 'tokenizer')  # an l-DAE: its PCA is fitted first, its encoder exported last
        self.img_size = int(model.encoder.input_size()[-1]) if self.is_dae else int(model.input_size()[-1])
        self._noise_shape: Optional[Tuple[int, ...]] = None

    @property
    def trained(self) -> nn.Module:
        return self.model

    def prepare_stage(self, n: int) -> Optional[Tuple[str, Dict[str, Any]]]:
        return ('pca', dict(images=min(self.cfg.pca_images, n))) if self.is_dae else None

    def prepare(self, cfg: RunConfig, data: Optional[ImageData], folder: Any, rank: int, world: int,
                device: torch.device) -> None:
        if not self.is_dae:
            return
        if self.cfg.pca_from:  # the PCA fit is a step of the run (or taken from a fitted model's file)
            from .hub.checkpoint import read_checkpoint, unwrap_state_dict
            sd = unwrap_state_dict(read_checkpoint(self.cfg.pca_from))
            self.model.tokenizer.load_state_dict({k.split('tokenizer.', 1)[1]: v for k, v in sd.items()
                                                  if 'tokenizer.' in k})
        else:
            _fit_pca(self.model, self.cfg, data, folder, rank, world, device)

    def draws(self, generator: torch.Generator, batch: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self._noise_shape is None:
            self._noise_shape = tuple(self.model.noise_shape(x))
        return dict(t=self.model.schedule.sample_t(batch, generator=generator, device=x.device),
                    noise=randn((batch, *self._noise_shape), generator=generator, device=x.device))

    def forward(self, images: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model.training_loss(images, t, noise)

    def export(self, trained: nn.Module, cfg: RunConfig, out: Path) -> Path:
        return export_final(trained, self.cfg, out, self.is_dae)


# -- data -----------------------------------------------------------------------------------------------------

class _SeededFolder(torch.utils.data.Dataset):
    """An ImageFolder streamed by a DataLoader, each item transformed under a seed of (run seed, epoch, index)."""

    def __init__(self, root: str, img_size: int, aug: str, seed: int) -> None:
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder
        root_p = Path(root)
        self.folder = ImageFolder(str(root_p / 'train' if (root_p / 'train').is_dir() else root_p))
        norm = [T.PILToTensor()]
        if aug == 'rrc':
            self.transform = T.Compose([T.RandomResizedCrop(img_size, scale=(0.2, 1.0),
                                                            interpolation=T.InterpolationMode.BICUBIC),
                                        T.RandomHorizontalFlip(), *norm])
        else:
            self.transform = T.Compose([T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC),
                                        T.CenterCrop(img_size), *norm])
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[torch.Tensor, int]:
        from .data import open_rgb
        epoch, index = key
        path, label = self.folder.samples[index]
        img = open_rgb(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(self.seed, epoch, index))
            return self.transform(img), label


class Batches:
    """This rank's micro-batches of uint8 images, step after step, from ``start_step``.

    Step s of epoch e takes the slice [s G, (s + 1) G) of a permutation seeded by (seed, e), G the global batch;
    rank r takes the r-th of ``world`` equal parts and splits it into ``accum`` micro-batches. Each micro-batch comes
    with its offset in the global batch, where its crops, t and noise are read from the step's global draws.
    """

    def __init__(self, cfg: RunConfig, n: int, world: int, rank: int, start_step: int, total_steps: int,
                 data: Optional[ImageData], folder: Optional[_SeededFolder], device: torch.device) -> None:
        if cfg.batch_size % (world * cfg.accum_steps):
            raise ValueError(f'--batch-size {cfg.batch_size} must be divisible by processes x accumulation '
                             f'({world} x {cfg.accum_steps})')
        self.cfg, self.n, self.world, self.rank = cfg, n, world, rank
        self.steps_per_epoch = n // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f'--batch-size {cfg.batch_size} is larger than the data set ({n} images)')
        self.start_step, self.total_steps = start_step, total_steps
        self.data, self.folder, self.device = data, folder, device
        self.part = cfg.batch_size // world
        self.micro = self.part // cfg.accum_steps

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(step, offset in the global batch, uint8 images and their labels on the device)."""
        loader = self._loader() if self.folder is not None else None
        step, perm, perm_epoch = self.start_step, None, -1
        while step < self.total_steps:
            epoch, s = divmod(step, self.steps_per_epoch)
            for a in range(self.cfg.accum_steps):
                offset = self.rank * self.part + a * self.micro
                if loader is not None:
                    images, labels = (v.to(self.device, non_blocking=True) for v in next(loader)[:2])
                else:
                    if epoch != perm_epoch:
                        perm, perm_epoch = self._perm(epoch).to(self.device), epoch
                    lo = s * self.cfg.batch_size + offset
                    idx = perm[lo:lo + self.micro]
                    images, labels = self.data.images[idx], self.data.labels[idx]
                yield step, offset, images, labels
            step += 1

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(step_seed(self.cfg.seed, 1, epoch)))

    def _loader(self) -> Iterator:
        outer = self

        class Keys(torch.utils.data.Sampler):
            def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
                step, perm, perm_epoch = outer.start_step, None, -1
                while step < outer.total_steps:
                    epoch, s = divmod(step, outer.steps_per_epoch)
                    if epoch != perm_epoch:  # one permutation per epoch (a 1.28M-index permutation costs ~60 ms)
                        perm, perm_epoch = outer._perm(epoch).tolist(), epoch
                    for a in range(outer.cfg.accum_steps):
                        lo = s * outer.cfg.batch_size + outer.rank * outer.part + a * outer.micro
                        yield [(epoch, i) for i in perm[lo:lo + outer.micro]]
                    step += 1

            def __len__(self) -> int:
                return (outer.total_steps - outer.start_step) * outer.cfg.accum_steps

        return iter(torch.utils.data.DataLoader(self.folder, batch_sampler=Keys(), num_workers=self.cfg.workers,
                                                pin_memory=self.device.type == 'cuda', worker_init_fn=_ignore_stop))


def _ignore_stop(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 to the main process, which checkpoints and then stops them."""
    import signal
    for name in StopSignals.NAMES:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def step_draws(cfg: RunConfig, step: int, objective: Objective, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The random draws of a step for the whole global batch, on the device, from the step's counter-based seed: the
    objective's (t, noise, ...), then the crop parameters."""
    gen = torch.Generator(x.device).manual_seed(step_seed(cfg.seed, 2, step))
    draws = objective.draws(gen, cfg.batch_size, x)
    draws['crop'] = torch.rand(cfg.batch_size, 5, generator=gen, device=x.device)
    return draws


# -- checkpoints, distributed, logging ---------------------------------------------------------------------------

def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write atomically and durably: a temporary file in the same folder, flushed to the disk (fsync), then a rename
    (and the folder's entry synced), so that a machine that dies at any moment leaves the old or the new file."""
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform whose folders cannot be opened (Windows): the rename is what it offers
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Preempted(Exception):
    """A run stopped by SIGTERM or SIGUSR1 after writing its checkpoint at the step reached; ``--resume`` continues
    it. The command line exits with ``PREEMPTED_EXIT_CODE`` (75), which a requeue script can act on."""

    def __init__(self, step: int, path: Path, signal_name: str) -> None:
        super().__init__(f'{signal_name}: stopped at step {step} with its checkpoint {path}; continue with --resume')
        self.step, self.path = step, path


class StopSignals:
    """SIGTERM and SIGUSR1 (a scheduler's notice before preemption) set a flag the loop reads at step boundaries;
    the previous handlers are restored on leaving. Outside the main thread nothing is installed."""

    NAMES = ('SIGTERM', 'SIGUSR1')

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> 'StopSignals':
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Tuple[int, int, torch.device]]:
    """(rank, world, device) of this process. Under torchrun the process group is created on entry unless a caller
    already holds one (RepFusion holds one for both of its stages), and destroyed on leaving only by whoever created
    it; a normal exit waits for every process (process 0 may still be writing files)."""
    creates = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not dist.is_initialized()
    rank, world, dev = setup_distributed(device)
    try:
        yield rank, world, dev
        if world > 1:
            dist.barrier()
    finally:
        if creates:
            dist.destroy_process_group()


def setup_distributed(device: str) -> Tuple[int, int, torch.device]:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    use_cuda = torch.cuda.is_available() and device in ('auto', 'cuda')
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is available')
    rank, local = 0, 0
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group('nccl' if use_cuda else 'gloo')
        rank, local = dist.get_rank(), int(os.environ.get('LOCAL_RANK', '0'))
    if use_cuda:
        torch.cuda.set_device(local)
        return rank, world, torch.device('cuda', local)
    return rank, world, torch.device('cpu')


def resolve_amp(mode: str, device: torch.device) -> Optional[Dict[str, Any]]:
    """The autocast arguments of ``mode`` on ``device``. ``auto``: bf16 on a GPU and on a CPU with native bf16
    (AVX512-BF16 or AMX), float32 elsewhere; ``bf16``: bf16 wherever asked (on a CPU without native bf16 it is correct
    but many times slower: 12x measured, so a warning says so); ``off``: float32."""
    if mode == 'off':
        return None
    if device.type == 'cuda':
        return dict(device_type='cuda', dtype=torch.bfloat16)
    if cpu_has_native_bf16():
        return dict(device_type='cpu', dtype=torch.bfloat16)
    if mode == 'bf16':
        warnings.warn('--amp bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); bf16 autocast is emulated and '
                      'runs many times slower than float32 (--amp auto picks float32 here)', stacklevel=2)
        return dict(device_type='cpu', dtype=torch.bfloat16)
    return None


def _set_cpu_autocast(enabled: bool) -> None:
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4: the device-type API
        torch.set_autocast_enabled('cpu', enabled)
    else:  # torch < 2.4
        torch.set_autocast_cpu_enabled(enabled)


def _cpu_autocast_enabled() -> bool:
    return torch.is_autocast_enabled('cpu') if hasattr(torch, 'get_autocast_dtype') else torch.is_autocast_cpu_enabled()


class Float32DegenerateConvs:
    """Run, under CPU bf16 autocast, every convolution whose input is smaller than its stride in float32.

    The cause it works around: oneDNN's bf16 weight-gradient kernel (PyTorch 2.14's CPU convolution) leaves the taps
    of the weight gradient that see only padding unwritten when an input side is smaller than the stride (a 3x3,
    stride-2 convolution on a 1x1 map: timm's ImageNet-stem ResNets on 16-32 px images, whose last stage is 1x1).
    Those entries hold whatever the allocator had (1e29 was seen): training is then neither reproducible nor right.
    float32 (and bf16 on larger maps) computes them correctly. The guard costs a shape check per convolution call;
    the convolutions it moves to float32 are the ones on 1x1 maps, the cheapest of the network. ``found`` names them.
    """

    def __init__(self, module: nn.Module) -> None:
        self.found: List[str] = []
        self._handles = []
        for name, m in module.named_modules():
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
                self._handles.append(m.register_forward_pre_hook(
                    lambda mod, args, _name=name: self._before(_name, mod, args)))
                self._handles.append(m.register_forward_hook(self._after))

    @staticmethod
    def degenerate(conv: nn.Module, x: torch.Tensor) -> bool:
        """Whether an input side is smaller than the convolution's stride while it pads."""
        stride = conv.stride
        pads = conv.padding != 'valid' and (isinstance(conv.padding, str) or any(p > 0 for p in conv.padding))
        return bool(pads) and any(n < s for n, s in zip(x.shape[-len(stride):], stride))

    def _before(self, name: str, conv: nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        x = args[0]
        if not (_cpu_autocast_enabled() and torch.is_tensor(x) and self.degenerate(conv, x)):
            return None
        if name not in self.found:
            self.found.append(name)
            warnings.warn(f'{name or type(conv).__name__}: a stride-{tuple(conv.stride)} convolution on a '
                          f'{tuple(x.shape[2:])} input runs in float32 under CPU bf16 autocast (oneDNN leaves part of '
                          f'its bf16 weight gradient unwritten on inputs smaller than the stride)', stacklevel=2)
        conv._ldae_float32 = True
        _set_cpu_autocast(False)
        return (x.float(), *args[1:])

    @staticmethod
    def _after(conv: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        if conv.__dict__.pop('_ldae_float32', False):
            _set_cpu_autocast(True)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class Log:
    """Rank 0's record of a run: a line per stage and one JSON line per log step, on stdout and in OUT/log.jsonl."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(out / 'log.jsonl', 'a') if enabled else None

    def __call__(self, **record: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        print(line, flush=True)
        self.file.write(line + '\n')
        self.file.flush()

    def stage(self, name: str, **info: Any) -> None:
        self(event='stage', stage=name, time=round(time.time(), 1), **info)

    def close(self) -> None:
        if self.file:
            self.file.close()


def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, unit='step', dynamic_ncols=True, disable=None if enabled else True)


# -- the run --------------------------------------------------------------------------------------------------------

def _load_data(cfg: RunConfig, img_size: int, device: torch.device, is_main: bool
               ) -> Tuple[Optional[ImageData], Optional[_SeededFolder], int]:
    if not cfg.data_root:
        raise ValueError('--data-root is required (an ImageFolder, a CIFAR-10 folder or an .npz file)')
    stream = cfg.in_memory == 'no'
    if cfg.in_memory == 'auto' and cfg.dataset == 'folder':
        from torchvision.datasets import ImageFolder
        root = Path(cfg.data_root)
        if not root.exists():
            raise FileNotFoundError(f'--data-root not found: {root}')
        stream = len(ImageFolder(str(root / 'train' if (root / 'train').is_dir() else root))) > 200_000
    if stream:
        if cfg.dataset != 'folder':
            raise ValueError("in_memory='no' streams ImageFolders only")
        folder = _SeededFolder(cfg.data_root, img_size, cfg.aug, cfg.seed)
        return None, folder, len(folder)
    data = load_split(cfg.dataset, cfg.data_root, 'train', img_size, download=cfg.download, progress=is_main)
    return data.to(device), None, len(data)


def _num_classes(data: Optional[ImageData], folder: Optional[_SeededFolder]) -> int:
    if data is not None:
        return len(data.classes) if data.classes else int(data.labels.max().item()) + 1
    return len(folder.folder.classes)


def _fit_pca(model: nn.Module, cfg: TrainConfig, data: Optional[ImageData], folder: Optional[_SeededFolder],
             rank: int, world: int, device: torch.device) -> None:
    """Stream ``pca_images`` images (the epoch-0 order, this rank's share) into float64 sums; all-reduce; fit."""
    n = len(data) if data is not None else len(folder)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(cfg.seed, 1, 0)))[:min(cfg.pca_images, n)]
    mine = perm[rank::world]
    stats = model.tokenizer.new_stats()
    g = torch.Generator().manual_seed(step_seed(cfg.seed, 3, rank))
    for i in range(0, len(mine), 1024):
        idx = mine[i:i + 1024]
        if data is not None:
            batch = normalize(data.images[idx.to(data.images.device)])
        else:
            batch = normalize(torch.stack([folder[(0, int(j))][0] for j in idx]))
        model.tokenizer.accumulate(stats, batch, patches_per_image=cfg.pca_patches_per_image, generator=g)
    stats.all_reduce(device=device if device.type == 'cuda' else None)
    model.tokenizer.set_from_stats(stats)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run a denoising config to its end (or resume it); returns the last step, the last log record and the weights'
    path."""
    def make() -> Objective:
        model = build_model(cfg)
        if cfg.grad_checkpointing:
            if not hasattr(model, 'set_grad_checkpointing'):
                raise ValueError(f'--grad-checkpointing is not available for {cfg.model}')
            model.set_grad_checkpointing(True)
        return DenoisingObjective(model, cfg)
    return run(cfg, make)


def run(cfg: RunConfig, make_objective: Callable[[], Objective]) -> Dict[str, Any]:
    """The training loop every run of the zoo shares: one process or torchrun, exact resume, device-resident data,
    counter-based draws, no per-step host sync, bf16 autocast, EMA, atomic checkpoints, a log line per stage."""
    if not cfg.out:
        raise ValueError('--out is required')
    with process_group(cfg.device) as (rank, world, device):
        with undo_on_failure(Path(cfg.out), enabled=rank == 0):
            return _run(cfg, make_objective, rank, world, device)


@contextlib.contextmanager
def undo_on_failure(out: Path, enabled: bool = True) -> Iterator[None]:
    """A run that fails before its first checkpoint leaves ``out`` as it found it: the folder is removed if the run
    created it, else what the run added to it (its log, its config). A run with a checkpoint (in ``out`` or a stage
    folder below it) keeps everything: it resumes from there."""
    import shutil
    before = {p.name for p in out.iterdir()} if out.is_dir() else None
    try:
        yield
    except BaseException:
        if enabled and out.is_dir() and not any(out.rglob(CKPT_NAME)):
            if before is None:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for path in out.iterdir():
                    if path.name not in before:
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def _run(cfg: RunConfig, make_objective: Callable[[], Objective], rank: int, world: int, device: torch.device
         ) -> Dict[str, Any]:
    is_main = rank == 0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out, is_main)
    if is_main:  # the resolved config, beside the checkpoints and at the head of the log
        from .hub.publish import write_text_atomic
        config = dataclasses.asdict(cfg)
        write_text_atomic(out / 'config.json', json.dumps(config, indent=1, default=str) + '\n')
        log(event='config', config={k: v for k, v in config.items() if k != 'sources'},
            **({'sources': cfg.sources} if cfg.sources else {}))
    torch.manual_seed(cfg.seed)

    objective = make_objective()
    log.stage('data', dataset=cfg.dataset, root=str(cfg.data_root))
    data, folder, n = _load_data(cfg, objective.img_size, device, is_main)
    objective.build(_num_classes(data, folder))
    objective = objective.to(device)
    model = objective.trained
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f'--batch-size {cfg.batch_size} is larger than the data set ({n} images)')
    epoch_steps = cfg.epochs * steps_per_epoch
    total_steps = cfg.max_steps or epoch_steps
    # warmup is a fraction of the schedule, laid over the run's real length
    warmup = int(round(total_steps * min(1.0, cfg.warmup_epochs / max(cfg.epochs, 1e-9))))
    peak_lr = cfg.lr or cfg.blr * cfg.batch_size / 256
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.ema)
    opt = build_optimizer(model, cfg, peak_lr, device)
    start_step = 0
    ckpt_path = out / CKPT_NAME
    if cfg.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        check_resume(cfg, state, total_steps, ckpt_path)
        model.load_state_dict(state['model'])
        opt.load_state_dict(state['optimizer'])
        if ema is not None and 'ema' in state:
            ema.module.load_state_dict(state['ema'])
        start_step = int(state['step'])
        log(event='resumed', step=start_step, checkpoint=str(ckpt_path))
    else:
        stage = objective.prepare_stage(n)
        if stage is not None:
            log.stage(stage[0], **stage[1])
        objective.prepare(cfg, data, folder, rank, world, device)
        if ema is not None:
            ema.module.load_state_dict(model.state_dict())

    net: nn.Module = objective
    if cfg.compile:
        net = torch.compile(net)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda' else None,
                                                  find_unused_parameters=objective.unused_parameters)
    amp = resolve_amp(cfg.amp, device)
    if amp and device.type == 'cpu':
        Float32DegenerateConvs(objective)
    batches = Batches(cfg, n, world, rank, start_step, total_steps, data, folder, device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)
    log.stage('train', steps=total_steps, start=start_step, steps_per_epoch=steps_per_epoch, warmup_steps=warmup,
              peak_lr=peak_lr, device=str(device), amp=bool(amp), world=world, in_memory=data is not None)
    progress = _progress(total_steps, start_step, is_main and not cfg.quiet)
    t0, seen, last, draws, loss, done = time.time(), 0, {}, None, None, start_step

    def check_finite(step_now: int) -> None:
        flag = bad.clone().float()
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            where = int(bad_step.item())
            raise FloatingPointError(
                f'non-finite loss ({bad_loss.item() if bool(bad) else "on another process"}) at step {where} '
                f'(epoch {max(where, 0) // steps_per_epoch}); the run stopped and the last good checkpoint is kept: '
                f'{ckpt_path if ckpt_path.exists() else "none written yet"}. Lower --lr / --blr, or check the data.')

    def checkpoint(step: int) -> None:
        if is_main:
            state = dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, total_steps=total_steps,
                         config=dataclasses.asdict(cfg))
            if ema is not None:
                state['ema'] = ema.module.state_dict()
            if cfg.keep_last > 1 and ckpt_path.exists():  # the previous one stays, under its step's name
                _keep_as(ckpt_path, out / f'ckpt_step{saved[0]:08d}.pth')
            save_checkpoint(ckpt_path, state)
            saved[0] = step
            epoch, within = divmod(step, steps_per_epoch)
            if cfg.keep_every_epochs and not within and epoch % cfg.keep_every_epochs == 0:
                _keep_as(ckpt_path, out / f'ckpt_epoch{epoch:04d}.pth')
            for old in sorted(out.glob('ckpt_step*.pth'))[:-(cfg.keep_last - 1) or None]:
                old.unlink()
        if world > 1:
            dist.barrier()

    saved = [start_step]  # the step of the newest checkpoint

    with StopSignals() as signals:  # SIGTERM / SIGUSR1: a checkpoint at the next step boundary, then stop
        for step, offset, images, labels in batches:
            micro_i = (offset % batches.part) // batches.micro
            x = normalize(images)
            if micro_i == 0:
                lr = lr_at(step, total_steps, warmup, peak_lr)
                for group in opt.param_groups:
                    group['lr'] = lr
                objective.begin_step(step, steps_per_epoch)
                draws = step_draws(cfg, step, objective, x)
            sl = slice(offset, offset + len(x))
            if data is not None and cfg.aug != 'center':
                x = augment(x, cfg.aug, u=draws['crop'][sl])
            sync = micro_i == cfg.accum_steps - 1
            ctx = net.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(**amp) if amp else contextlib.nullcontext():
                    loss = net(x, labels, **{k: v[sl] for k, v in draws.items() if k != 'crop'})
                (loss / cfg.accum_steps).backward()
            is_bad = ~torch.isfinite(loss.detach())
            first = is_bad & ~bad
            bad_step.copy_(torch.where(first, torch.full_like(bad_step, step), bad_step))
            bad_loss.copy_(torch.where(first, loss.detach().float(), bad_loss))
            bad |= is_bad
            seen += len(x) * world
            if not sync:
                continue
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step=step)
            step += 1
            done = step
            progress.update(1)
            is_log = step % cfg.log_every == 0 or step == total_steps
            is_ckpt = (step % cfg.ckpt_every == 0 or step == total_steps or (cfg.keep_every_epochs > 0 and (
                step % (cfg.keep_every_epochs * steps_per_epoch) == 0)))
            if is_log or is_ckpt or step % cfg.nan_check_every == 0:
                check_finite(step)
            if is_main and is_log:
                dt = time.time() - t0
                last = dict(step=step, epoch=round(step / steps_per_epoch, 3), loss=round(loss.item(), 6), lr=lr,
                            img_per_s=round(seen / max(dt, 1e-9), 1), elapsed_s=round(dt, 1), **objective.log_record())
                log(**last)
            if is_ckpt:
                checkpoint(step)
            if step < total_steps and _stop_requested(signals, world, step, cfg.nan_check_every, device):
                if not is_ckpt:
                    check_finite(step)
                    checkpoint(step)
                progress.close()
                log(event='preempted', step=step, signal=signals.received or 'a signal on another process',
                    checkpoint=str(ckpt_path))
                log.close()
                raise Preempted(step, ckpt_path, signals.received or 'a stop signal (on another process)')
    progress.close()
    result: Dict[str, Any] = dict(step=done, total_steps=total_steps, last=last)
    if is_main and done >= total_steps:
        log.stage('export')
        result['weights'] = str(objective.export(model if ema is None else ema.module, cfg, out))
    log.close()
    return result


def _keep_as(path: Path, name: Path) -> None:
    """Keep the file at ``path`` also as ``name`` (a hard link: no copy; a copy where links are not offered)."""
    import shutil
    name.unlink(missing_ok=True)
    try:
        os.link(path, name)
    except OSError:
        shutil.copy2(path, name)


def _stop_requested(signals: StopSignals, world: int, step: int, every: int, device: torch.device) -> bool:
    """Whether to stop at this step boundary: at once in one process; under torchrun every ``every`` steps (the
    processes agree by an all-reduce, which waits on the device, so it runs at the non-finite check's cadence)."""
    if world == 1:
        return signals.received is not None
    if step % every:
        return False
    flag = torch.tensor([1.0 if signals.received else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def check_resume(cfg: RunConfig, state: Dict[str, Any], total_steps: int, path: Path) -> None:
    """Refuse to resume a checkpoint of another run: its model, batch, schedule length (steps) or seed (the config's
    ``resume_fields``) must be this config's, unless ``allow_config_change``."""
    saved = state.get('config') or {}
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    diff = [(f, saved.get(f), mine.get(f)) for f in cfg.resume_fields if f in saved and saved.get(f) != mine.get(f)]
    if 'total_steps' in state and int(state['total_steps']) != total_steps:
        diff.append(('schedule length in steps (--epochs / --max-steps)', int(state['total_steps']), total_steps))
    if diff and not cfg.allow_config_change:
        what = '; '.join(f'{f}: {a!r} in the checkpoint, {b!r} now' for f, a, b in diff)
        raise ValueError(f'{path} is a checkpoint of another run ({what}): resume with the same settings, or pass '
                         f'--allow-config-change to continue it anyway')


def export_final(model: nn.Module, cfg: TrainConfig, out: Path, is_dae: bool) -> Path:
    """``model.safetensors`` (the whole model) and, for an l-DAE, ``encoder/``: its conditional encoder, with the
    arguments (schedule and t included) that rebuild it, as a ``save_pretrained`` folder."""
    import timm
    from .hub.publish import save_pretrained, save_safetensors
    path = save_safetensors(model.state_dict(), out / 'model.safetensors', metadata={'architecture': cfg.model})
    if is_dae:
        enc = timm.create_model(cfg.model, pretrained=True, merged=False, pretrained_cfg_overlay=dict(file=str(path)),
                                **model.encoder_args)
        save_pretrained(enc, out / 'encoder', model_card=dict(
            description=f'l-DAE encoder ({cfg.model}) trained with ldae_models.train.',
            training={k: v for k, v in dataclasses.asdict(cfg).items() if k not in ('data_root', 'out')}))
    return path
