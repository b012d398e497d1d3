"""The input stage in front of a latent-diffusion encoder: the SD VAE and the forward-process noise.

``DiffusionInput(model)`` is what ``timm.create_model(dit_name, vae=..., noisy_input=True)`` returns when the
encoder alone cannot do it (a merged ViT, or any DiT given a VAE): ``images -> [VAE encode * scale] -> [noise at t]
-> model``. It answers the encoder contract by delegation: the VAE encodes once per batch (``encode_input``), the
noise is the model's schedule at t (``noise_input``), the taps are the model's.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .extractor import FeatureExtractor

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


class DiffusionInput(FeatureExtractor, nn.Module):
    """``images -> [VAE encode * vae_scale] -> [x_t at the model's t] -> model``; the model stays ``.model``.

    The VAE is frozen; its latent is the posterior mean unless ``vae_sample=True``. Set ``.generator`` (or pass
    ``generator=``) to seed the noise.
    """

    def __init__(
            self,
            model: nn.Module,                             # the encoder (merged or conditional) on latents
            noisy_input: bool = False,                    # noise the latent at the model's t (DDAE's protocol)
            vae: Optional[Union[str, nn.Module]] = None,  # a diffusers AutoencoderKL, or its hub name
            vae_scale: float = 0.18215,                   # latents = VAE posterior * vae_scale (LDM / DiT)
            vae_sample: bool = False,                     # sample the posterior instead of its mean
    ) -> None:
        super().__init__()
        self.model = model
        self.noisy_input = noisy_input
        self.schedule = model.schedule
        self.t = model.t
        self.fixed_t = model.fixed_t
        self.vae = None if vae is None else load_vae(vae).eval().requires_grad_(False)
        self.vae_scale = vae_scale
        self.vae_sample = vae_sample
        self.generator: Optional[torch.Generator] = None
        self.num_features = getattr(model, 'num_features', None)
        cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
        if self.vae is not None:
            h, w = cfg.get('input_size', (4, 32, 32))[1:]
            cfg.update(input_size=(3, h * 8, w * 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # images in [-1, 1]
        self.pretrained_cfg = self.default_cfg = cfg

    @property
    def blocks(self) -> Any:
        return self.model.blocks

    def encode_input(self, images: torch.Tensor) -> torch.Tensor:
        """The latent the encoder sees (before noise)."""
        if self.vae is None:
            return images
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f'with a VAE the input is RGB images (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}')
        with torch.no_grad():
            dist = self.vae.encode(images).latent_dist
            return (dist.sample(generator=self.generator) if self.vae_sample else dist.mean) * self.vae_scale

    def tap(self, x: torch.Tensor, t: Optional[torch.Tensor], indices: List[int]) -> List[torch.Tensor]:
        return self.model.tap(x, t, indices)

    def prepare(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """What the model is called with: the (VAE-encoded) input, noised at the model's t when ``noisy_input``."""
        x = self.encode_input(x)
        if self.noisy_input:
            t = self.schedule.timesteps(self.t, x.shape[0], x.device)
            x = self.noise_input(x, t, generator=generator or self.generator)[0]
        return x

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.model(self.prepare(x, generator))

    def forward_intermediates(self, x: torch.Tensor, *args: Any, generator: Optional[torch.Generator] = None,
                              **kwargs: Any) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        return self.model.forward_intermediates(self.prepare(x, generator), *args, **kwargs)

    # -- timm's model API, the encoder's (what timm's train.py, validate.py and optimizers call) ------------------------
    def forward_features(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.model.forward_features(self.prepare(x, generator))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.model.reset_classifier(num_classes, global_pool)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {f'model.{n}' for n in getattr(self.model, 'no_weight_decay', lambda: set())()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """The encoder's layer groups, under ``model.`` (the frozen VAE has no trained parameter)."""
        def under(pattern: str) -> str:
            return '|'.join('^model\\.' + alt.lstrip('^') for alt in pattern.split('|'))
        inner = self.model.group_matcher(coarse)
        return {k: under(v) if isinstance(v, str) else [(under(p), o) for p, o in v] for k, v in inner.items()}
