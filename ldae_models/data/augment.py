"""What happens to a batch of center squares on the device: ``normalize`` (uint8 to the model's range) and ``augment``
(random crops and flips from given uniforms, so that a rank takes its slice of draws made for a whole global batch)."""
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ['AUGMENTATIONS', 'augment', 'normalize']

AUGMENTATIONS = ('center', 'flip', 'rrc', 'pad_crop')

_STATS: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, std, device) -> tensors, made once


def _stats(mean: Sequence[float], std: Sequence[float], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (1, C, 1, 1) tensors on ``device``, copied there once (a step makes no host-to-device copy)."""
    key = (tuple(float(m) for m in mean), tuple(float(s) for s in std), str(device))
    if key not in _STATS:
        _STATS[key] = (torch.tensor(key[0], device=device).view(1, -1, 1, 1),
                       torch.tensor(key[1], device=device).view(1, -1, 1, 1))
    return _STATS[key]


def normalize(images: torch.Tensor, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)
              ) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std`` on the images' device (default: [-1, 1])."""
    m, s = _stats(mean, std, images.device)
    return (images.float() / 255.0 - m) / s


def augment(images: torch.Tensor, mode: str, generator: Optional[torch.Generator] = None,
            scale: Tuple[float, float] = (0.2, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
            u: Optional[torch.Tensor] = None, pad: int = 4, fill: float = -1.0) -> torch.Tensor:
    """Batched augmentation of float images (B, C, H, W), the random draws from ``generator`` (or given: ``u``, (B, 5)
    uniforms in [0, 1)).

    ``'center'``: none (the images are the center square already: the paper's default). ``'flip'``: a horizontal
    flip with probability 1/2 (DiT's). ``'rrc'``: a random resized crop of the center square (area fraction in
    ``scale``, aspect ratio in ``ratio``, log-uniform; MAE's ranges) back to H x W with bilinear sampling, and the
    flip. ``'pad_crop'``: the CIFAR crop: the image padded by ``pad`` pixels of ``fill`` (black of [-1, 1] images),
    an H x W window at a uniform integer offset, and the flip (exact: no resampling).
    """
    if mode == 'center':
        return images
    if mode not in AUGMENTATIONS:
        raise ValueError(f'augmentation must be one of {AUGMENTATIONS}, got {mode!r}')
    B = images.shape[0]
    if u is None:
        dev = generator.device if generator is not None else images.device
        u = torch.rand(B, 5, generator=generator, device=dev)
    u = u.to(images.device)
    flip = u[:, 4] < 0.5
    if mode == 'flip':
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    if mode == 'pad_crop':
        H, W = images.shape[-2:]
        dy = (u[:, 2] * (2 * pad + 1)).long().clamp(max=2 * pad)  # the window's corner in the padded image
        dx = (u[:, 3] * (2 * pad + 1)).long().clamp(max=2 * pad)
        padded = F.pad(images, (pad, pad, pad, pad), value=fill)
        rows = dy[:, None] + torch.arange(H, device=images.device)
        cols = dx[:, None] + torch.arange(W, device=images.device)
        cols = torch.where(flip[:, None], cols.flip(-1), cols)
        out = padded[torch.arange(B, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)   # crop width and height as fractions of the image
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)       # crop centre in [-1, 1] coordinates, the crop inside the image
    cy = (1 - h) * (2 * u[:, 3] - 1)
    theta = torch.zeros(B, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = w * torch.where(flip, -1.0, 1.0), cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode='bilinear', padding_mode='reflection', align_corners=False)
