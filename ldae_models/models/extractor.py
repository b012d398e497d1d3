"""The encoder contract: every extractor of the zoo answers one question the same way.

    features = model.extract_features(images, layers=[5, 11], ts=[0, 10, 80], noisy_input=False)
    # {(layer, t): (B, C) pooled features}  (pool=False: (B, C, h, w) maps)

One forward pass per t gives every requested layer (the pass stops after the deepest one). Each t is validated once,
by the model's noise schedule, before any work. ``noisy_input=True`` first noises the input at t the way the model
was trained (l-DAE: in its PCA latent; DiT and the UNets: the DDPM forward process), with ``generator`` for the draws
(one per t, in the order of ``ts``); the default is the model's own ``noisy_input`` (DDAE's protocol for the UNets).

A model implements four small pieces and inherits the rest:

- ``num_taps``: how many layers can be tapped (default: ``len(self.blocks)``; a UNet's blocks are its decoder
  blocks, DDAE's ``out_k`` is block k - 1);
- ``encode_input(images)``: checks the input and maps it to what the network sees (a VAE encodes here);
- ``noise_input(x, t)``: the training noise at a checked (B,) t; returns (x_t, noise);
- ``tap(x, t, indices)``: one forward pass at a checked (B,) t, the maps of the layers ``indices`` (sorted).

Merged encoders (``fixed_t``) compute one t only. ``as_extractor`` wraps any other timm model that has
``forward_intermediates`` (a random ViT used as a floor, an exported plain ViT, a distilled student): it has no t.
"""
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..layers.schedules import NoiseSchedule


def is_fx_tracing() -> bool:
    """Whether torch.fx is tracing (checks in Python would branch on traced values: they are skipped)."""
    from torch.fx import _symbolic_trace as fx
    return (getattr(fx, 'is_fx_symbolic_tracing', None) or fx.is_fx_tracing)()

__all__ = ['FeatureExtractor', 'TimmFeatures', 'as_extractor', 'FeatureDict', 'LayerSpec', 'TimestepSpec']

FeatureDict = Dict[Tuple[int, Optional[float]], torch.Tensor]
LayerSpec = Union[int, Sequence[int], None]
TimestepSpec = Union[int, float, Sequence[Union[int, float]], None]


def _as_list(x: Union[int, float, Iterable, None]) -> list:
    if x is None:
        return [None]
    if isinstance(x, (int, float)):
        return [x]
    return list(x)


class FeatureExtractor:
    """Mixin of every extractor (see the module docstring). Attributes a model sets: ``schedule`` (None: no t),
    ``t`` (its default t), ``noisy_input`` (the default of the switch), ``fixed_t`` (merged: ``t`` only)."""

    schedule: Optional[NoiseSchedule] = None
    t: Optional[float] = None
    noisy_input: bool = False
    fixed_t: bool = False

    # -- what a model implements ---------------------------------------------------------------------------
    @property
    def num_taps(self) -> int:
        return len(self.blocks)

    @property
    def default_layer(self) -> int:
        """The layer the model's own protocol taps (0-based; -1: the last), e.g. DDAE's out_6 for the UNets."""
        return -1

    def encode_input(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def noise_input(self, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.schedule is None:
            raise ValueError(f'{type(self).__name__} has no noise schedule: it cannot noise its input')
        return self.schedule.add_noise(x, t, noise=noise, generator=generator)

    def tap(self, x: torch.Tensor, t: Optional[torch.Tensor], indices: List[int]) -> List[torch.Tensor]:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------------
    def add_noise(self, images: torch.Tensor, t: Union[int, float, torch.Tensor, None] = None,
                  noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The input noised the way the model was trained, at a user's t (default: the model's; checked):
        ``(x_t, noise)``. For l-DAE ``x_t`` is the inverse-PCA image of the noisy latent and ``noise`` the latent eps."""
        x = self.encode_input(images)
        if self.schedule is None:
            raise ValueError(f'{type(self).__name__} has no noise schedule')
        t = self.schedule.timesteps(self.t if t is None else t, x.shape[0], x.device)
        return self.noise_input(x, t, noise=noise, generator=generator)

    def resolve_layers(self, layers: LayerSpec) -> Tuple[List[int], List[int]]:
        """(layers as given, their 0-based indices); None means the last layer."""
        given = [-1] if layers is None else _as_list(layers)
        if not given:
            raise ValueError('layers is empty')
        n = self.num_taps
        for layer in given:
            if not isinstance(layer, int) or not -n <= layer < n:
                raise ValueError(f'layer {layer!r} is out of range for {type(self).__name__} with {n} tappable layers '
                                 f'(0..{n - 1}, or negative from the last){self._layers_hint()}')
        return given, [layer % n for layer in given]

    def _layers_hint(self) -> str:
        """Appended to the out-of-range error (a tapped UNet says how to get its later blocks)."""
        return ''

    def resolve_ts(self, ts: TimestepSpec) -> List[Optional[float]]:
        """Checked timesteps as Python floats (None: the model's default t); validated here, once."""
        out = []
        for t in _as_list(ts):
            t = self.t if t is None else t
            if self.schedule is None:
                if t is not None:
                    raise ValueError(f'{type(self).__name__} has no timestep: pass ts=None')
                out.append(None)
                continue
            if t is None:
                raise ValueError(f'{type(self).__name__} has no default t: pass ts=')
            t = float(t)
            if self.fixed_t and t != self.t:
                raise ValueError(f'a merged encoder computes features at the t it was merged at ({self.t:g}) only, '
                                 f'got t={t:g}; use the conditional encoder (merged=False) for other ts')
            self.schedule.check_value(t)
            out.append(t)
        return out

    @torch.no_grad()
    def extract_features(
            self,
            images: torch.Tensor,
            layers: LayerSpec = None,
            ts: TimestepSpec = None,
            noisy_input: Optional[bool] = None,
            generator: Optional[torch.Generator] = None,
            pool: bool = True,
    ) -> FeatureDict:
        """Features of ``layers`` at timesteps ``ts``: ``{(layer, t): (B, C)}`` (``pool=False``: (B, C, h, w)).

        Args:
            images: (B, C, H, W), normalised as the model's pretrained cfg says ([-1, 1] for l-DAE).
            layers: 0-based indices (negative counts from the last; None: the last); keys use them as given.
            ts: Timesteps (None: the model's default t); the keys hold them as floats.
            noisy_input: Noise the input at each t first (default: the model's setting).
            generator: Seeds the noise, one draw per t in the order of ``ts``.
            pool: Average over positions (tokens of a ViT, pixels of a UNet map).
        """
        given, idx = self.resolve_layers(layers)
        ts_list = self.resolve_ts(ts)
        noisy = self.noisy_input if noisy_input is None else noisy_input
        take = sorted(set(idx))
        x0 = self.encode_input(images)
        out: FeatureDict = {}
        for t in ts_list:
            tb = None if t is None else torch.full((x0.shape[0],), t, device=x0.device)
            x = self.noise_input(x0, tb, generator=generator)[0] if noisy else x0
            maps = dict(zip(take, self.tap(x, tb, take)))
            for layer, i in zip(given, idx):
                out[(layer, t)] = maps[i].mean(dim=(-2, -1)) if pool else maps[i]
        return out


class TimmFeatures(FeatureExtractor, nn.Module):
    """Any timm model with ``forward_intermediates`` as an extractor without a timestep (a random ViT as a floor,
    an exported plain ViT, a distilled student)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(model, 'forward_intermediates'):
            raise TypeError(f'{type(model).__name__} has no forward_intermediates: it cannot be tapped')
        self.model = model
        self.pretrained_cfg = getattr(model, 'pretrained_cfg', None)

    @property
    def num_taps(self) -> int:
        blocks = getattr(self.model, 'blocks', None) or getattr(self.model, 'stages', None)
        if blocks is not None:
            return len(blocks)
        return len(self.model.feature_info)

    def tap(self, x: torch.Tensor, t: Optional[torch.Tensor], indices: List[int]) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=indices, intermediates_only=True, output_fmt='NCHW',
                                                stop_early=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def as_extractor(model: nn.Module) -> FeatureExtractor:
    """The model itself when it is a zoo extractor; a ``TimmFeatures`` view of any other timm model."""
    if isinstance(model, FeatureExtractor):
        return model
    if hasattr(model, 'forward_intermediates'):
        return TimmFeatures(model)
    raise TypeError(f'extract_features needs an ldae_models extractor or a timm model with forward_intermediates, '
                    f'got {type(model).__name__}')
