"""The DDPM forward process shared by DiT and the DDAE UNets (Ho et al. 2020; DiT's ``gaussian_diffusion``).

Linear betas from 1e-4 to 0.02 over T = 1000 steps, in float64; timesteps are indices 0..T-1 and
``q_sample`` gives ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.
"""
from typing import Optional, Tuple

import torch

__all__ = ['linear_betas', 'alphas_cumprod', 'q_sample', 'randn_like']


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DiT's ``get_named_beta_schedule('linear', T)``: the 1000-step range rescaled to T steps, float64."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s), float64 (T,)."""
    return torch.cumprod(1.0 - linear_betas(num_timesteps, beta_start, beta_end), dim=0)


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (seeded draws do not depend on
    where ``x`` lives), then moved to ``x``'s device and dtype."""
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)


def q_sample(
        x0: torch.Tensor,
        t: torch.Tensor,
        abar: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Noise ``x0`` (B, ...) to integer timesteps ``t`` (B,) with the cumulative products ``abar`` (T,).

    Returns (x_t, eps).
    """
    if noise is None:
        noise = randn_like(x0, generator)
    a = abar.to(x0.device)[t.long()].to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, noise
