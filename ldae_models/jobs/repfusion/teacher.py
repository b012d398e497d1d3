"""RepFusion's teacher: a diffusion extractor of the zoo, frozen and conditional, read at (layer or module, t).

``load_teacher(name)`` loads it (always ``merged=False``: t is the policy's choice) and refuses a name without weights;
``Teacher`` wraps it with what distillation asks of it: the grid of t the policy chooses from, the pooled feature of
each image at its t (noised at t by the teacher's schedule, or clean with t as conditioning), and its width.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ...models.extractor import FeatureExtractor
from .parts import pool

__all__ = ['Teacher', 'load_teacher']


def load_teacher(name: str, teacher_args: Dict[str, Any], allow_random: bool = False) -> nn.Module:
    """The teacher a name gives, conditional, in eval mode. A name that asks for no weights (no tag, no checkpoint) is
    refused, naming the tags that have them, unless ``allow_random`` (a smoke run)."""
    from ...models import load_model, names_weights, pretrained_cfg_for
    kwargs = dict(teacher_args)
    if not name.startswith(('hf-hub:', 'local-dir:')):
        pretrained_cfg_for(name)  # an unknown model or tag: named, with the nearest names
    if not (names_weights(name) or kwargs.get('checkpoint') or allow_random):
        import timm
        tags = timm.list_pretrained(name.split('.')[0] + '.*')
        raise ValueError(f'the teacher {name!r} names no weights (a random network teaches nothing): name a '
                         f'pretrained tag' + (f', e.g. {", ".join(tags[:3])}' if tags else
                                              f' (none exists for {name}: pass --teacher-args {{"checkpoint": FILE}})')
                         + '; --allow-random-teacher accepts it for a smoke run')
    try:
        teacher = load_model(name, merged=False, **kwargs)
    except TypeError as e:  # a family without a merged form (the UNets): conditional already
        if 'merged' not in str(e):
            raise
        teacher = load_model(name, **kwargs)
    return teacher.eval()


class Teacher(nn.Module):
    """A frozen diffusion extractor as RepFusion's teacher.

    Args:
        model: an extractor of the zoo with a noise schedule of step indices (l-DAE, DiT, DDAE UNet), conditional.
        name: its name, for messages.
        layer: the tapped block (0-based; default its own tap; with ``module``: how far the teacher runs, default
            its first block).
        module: a module whose output is distilled instead of a block (e.g. ``mid.1.res.conv2``, the DDPM UNet's
            mid block: the official code's tap).
        clean_input: the clean image with t as conditioning (the official code) instead of the image noised at t.
        fixed_t: the one t of a fixed policy (default the teacher's own); None: the policy's grid, ``t_bins`` steps
            evenly over the teacher's [0, T).
    """

    def __init__(self, model: nn.Module, name: str, layer: Optional[int] = None, module: Optional[str] = None,
                 clean_input: bool = False, fixed_t: Optional[float] = None, fixed: bool = False,
                 t_bins: int = 1000) -> None:
        super().__init__()
        if not isinstance(model, FeatureExtractor) or getattr(model, 'schedule', None) is None:
            raise ValueError(f'the teacher {name!r} is not a diffusion extractor of the zoo (an l-DAE, DiT or DDAE UNet '
                             f'with a noise schedule): got {type(model).__name__}')
        if model.fixed_t:
            raise ValueError(f'the teacher {name!r} is a merged encoder (one t); RepFusion needs the conditional one '
                             f'(merged=False)')
        self.model, self.name, self.clean_input = model, name, clean_input
        model.requires_grad_(False)
        model.eval()
        self.module: Optional[nn.Module] = None
        self.module_name = module
        if module:
            modules = dict(model.named_modules())
            if module not in modules:
                near = [n for n in modules if n and n.startswith(module.split('.')[0])][:8]
                raise ValueError(f'the teacher {name} has no module {module!r}'
                                 + (f'; modules with that prefix: {near}' if near else '; see model.named_modules()'))
            self.module = modules[module]
        default = 0 if module else model.default_layer
        self.layer = model.resolve_layers(default if layer is None else layer)[1][0]
        T = getattr(model.schedule, 'num_timesteps', None)
        if T is None:
            raise ValueError(f'the policy picks step indices; the teacher schedule {type(model.schedule).__name__} '
                             f'has none (use a step-index schedule: ddpm, linear_sigma)')
        if fixed:
            grid = model.resolve_ts([model.t if fixed_t is None else fixed_t])[0] * torch.ones(1)  # checked
        else:
            if not 2 <= t_bins <= T:
                raise ValueError(f'--t-bins must be in [2, {T}] (the teacher has {T} steps), got {t_bins}')
            grid = torch.linspace(0, T - 1, t_bins).round()
        self.register_buffer('grid', grid, persistent=False)
        self.num_timesteps = float(T)
        size = int(model.pretrained_cfg['input_size'][-1])
        with torch.no_grad():  # one image's noise shape, from one small forward pass of the input stage
            x0 = model.encode_input(torch.zeros(1, 3, size, size))
            self.noise_shape: Tuple[int, ...] = tuple(model.noise_input(x0, grid[:1])[1].shape[1:])

    def train(self, mode: bool = True) -> 'Teacher':
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """The pooled feature (B, C) at each image's t ((B,) step indices on the grid, already checked)."""
        x = self.model.encode_input(images)
        if not self.clean_input:
            x = self.model.noise_input(x, t, noise=noise)[0]
        if self.module is None:
            return pool(self.model.tap(x, t, [self.layer])[0]).float()
        seen: List[torch.Tensor] = []
        hook = self.module.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
        try:
            self.model.tap(x, t, [self.layer])
        finally:
            hook.remove()
        if not seen:
            raise ValueError(f'the teacher module {self.module_name!r} does not run before block {self.layer}: raise '
                             f'--teacher-layer')
        return pool(seen[-1]).float()

    def width(self, img_size: int) -> int:
        """The width of the distilled feature (one forward pass on two blank images)."""
        dev = self.grid.device
        return self(torch.zeros(2, 3, img_size, img_size, device=dev), self.grid[:1].expand(2), None).shape[1]
