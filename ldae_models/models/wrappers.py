"""Input stages in front of a latent-diffusion encoder: the SD VAE and the forward-process noise."""
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..layers.diffusion import alphas_cumprod, q_sample

__all__ = ['DiffusionInput', 'load_vae']


def load_vae(vae: Union[str, nn.Module]) -> nn.Module:
    """A diffusers ``AutoencoderKL``: given, or loaded by hub name (e.g. ``stabilityai/sd-vae-ft-ema``)."""
    if isinstance(vae, nn.Module):
        return vae
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError('vae= needs diffusers: pip install diffusers') from e
    return AutoencoderKL.from_pretrained(vae)


class DiffusionInput(nn.Module):
    """``images -> [VAE encode * scale] -> [x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps] -> model``.

    Used when an encoder is asked for ``vae=`` or ``noise=True``. ``model`` is the encoder (merged or
    conditional); it stays reachable as ``.model``. The VAE is frozen. Set ``.generator`` (or pass
    ``generator=``) to seed the noise; the latent is the posterior mean unless ``vae_sample=True``.
    """

    def __init__(
            self,
            model: nn.Module,
            noise_t: Optional[float] = None,          # add DDPM noise at this timestep (None: clean input)
            vae: Optional[Union[str, nn.Module]] = None,
            vae_scale: float = 0.18215,
            vae_sample: bool = False,
            num_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        self.model = model
        self.noise_t = None if noise_t is None else int(round(noise_t))
        self.register_buffer('abar', alphas_cumprod(num_timesteps), persistent=False)
        self.vae = None
        if vae is not None:
            self.vae = load_vae(vae).eval().requires_grad_(False)
        self.vae_scale = vae_scale
        self.vae_sample = vae_sample
        self.generator: Optional[torch.Generator] = None
        cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
        if self.vae is not None:
            pe = getattr(model, 'patch_embed', None) or getattr(getattr(model, 'model', None), 'patch_embed', None)
            h, w = tuple(pe.img_size) if pe is not None else cfg.get('input_size', (4, 32, 32))[1:]
            cfg.update(input_size=(3, h * 8, w * 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # images in [-1, 1]
        self.pretrained_cfg = self.default_cfg = cfg
        self.num_features = getattr(model, 'num_features', None)

    @property
    def blocks(self) -> Any:
        return self.model.blocks

    def prepare(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The latent the encoder sees."""
        generator = generator or self.generator
        if self.vae is not None:
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f'with a VAE the input is RGB images (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}')
            with torch.no_grad():
                dist = self.vae.encode(x).latent_dist
                x = (dist.sample(generator=generator) if self.vae_sample else dist.mean) * self.vae_scale
        if self.noise_t is not None:
            t = torch.full((x.shape[0],), self.noise_t, device=x.device, dtype=torch.long)
            x = q_sample(x, t, self.abar, generator=generator)[0]
        return x

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.model(self.prepare(x, generator))

    def forward_intermediates(self, x: torch.Tensor, *args: Any, generator: Optional[torch.Generator] = None,
                              **kwargs: Any):
        return self.model.forward_intermediates(self.prepare(x, generator), *args, **kwargs)
