"""Feature taps: pooled features at any blocks and timesteps, all blocks of one t in one forward pass."""
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import VisionTransformer

from .models.ddae_unet import DDAEUNet

__all__ = ['extract_features', 'ddae_grid_features']

FeatureDict = Dict[Tuple[int, float], torch.Tensor]


def _as_list(x: Union[int, float, Iterable, None]) -> list:
    if x is None:
        return [None]
    if isinstance(x, (int, float)):
        return [x]
    return list(x)


@torch.no_grad()
def extract_features(
        model: nn.Module,
        images: torch.Tensor,
        layers: Union[int, Sequence[int]],
        ts: Union[int, float, Sequence[Union[int, float]], None] = None,
        noise: bool = False,
        generator: Optional[torch.Generator] = None,
) -> FeatureDict:
    """Token-mean features of blocks ``layers`` at timesteps ``ts``: ``{(layer, t): (B, C)}``.

    One forward pass per t gives every requested block (it stops after the deepest one).

    Args:
        model: A conditional encoder (``merged=False``), a full ``LatentDAE`` (its blocks are numbered
            encoder first, then decoder), a merged ViT (which only has the t it was merged at), or a DDAE UNet
            (its decoder blocks; index k - 1 is DDAE's out_k).
        images: (B, C, H, W), normalised as the model's pretrained cfg says ([-1, 1] for l-DAE).
        layers: 0-based block indices (negative counts from the last block); the keys use them as given.
        ts: Timestep indices in [0, T); None means the model's fixed t.
        noise: Add the model's training noise at level t to the input first (for l-DAE: in the PCA
            latent, so the input is the inverse-PCA projection of the noisy latent). Without it the
            clean image goes in, the paper's default transfer setting.
        generator: Seeds the noise (one draw per t, in the order of ``ts``).

    Returns:
        Dict mapping (layer, t) to a (B, C) float tensor; ``t`` is the resolved timestep.
    """
    layers_list: List[int] = _as_list(layers)
    ts_list = _as_list(ts)
    if not layers_list:
        raise ValueError('layers is empty')
    if isinstance(model, VisionTransformer):
        merged_t = getattr(model, 'merged_t', None)
        bad = [t for t in ts_list if t is not None and t != merged_t]
        if bad or noise:
            raise ValueError(f'a merged ViT only computes features at the t it was merged at ({merged_t}) and '
                             f'cannot add noise; use the conditional encoder (merged=False) for other ts or noise')
        ts_list = [merged_t]
        num_blocks = len(model.blocks)
    else:
        if not hasattr(model, 'forward_intermediates') or not hasattr(model, 'add_noise'):
            raise TypeError(f'extract_features needs an ldae_models encoder, DAE or merged ViT, got {type(model).__name__}')
        num_blocks = len(model.blocks)
    norm_layers = []
    for layer in layers_list:
        if not -num_blocks <= layer < num_blocks:
            raise ValueError(f'layer {layer} is out of range for a model with {num_blocks} blocks')
        norm_layers.append(layer % num_blocks)
    take = sorted(set(norm_layers))

    out: FeatureDict = {}
    for t in ts_list:
        if isinstance(model, VisionTransformer):
            feats = model.forward_intermediates(images, indices=take, intermediates_only=True, stop_early=True)
            t_key = t
        elif isinstance(model, DDAEUNet):  # noises inside, so that the noise matches its schedule
            t_key = model.t if t is None else t
            feats = model.forward_intermediates(images, t=t_key, indices=take, intermediates_only=True,
                                                stop_early=True, noise=noise, generator=generator)
        else:
            enc = getattr(model, 'encoder', model)
            t_key = enc.timesteps(t, images.shape[0], images.device)[0].item() if t is None else t
            x = model.add_noise(images, t_key, generator=generator)[0] if noise else images
            feats = model.forward_intermediates(x, t=t_key, indices=take, intermediates_only=True, stop_early=True)
        by_index = {i: f.mean(dim=(-2, -1)) for i, f in zip(take, feats)}  # (B, C, h, w) -> (B, C)
        for layer, idx in zip(layers_list, norm_layers):
            out[(layer, t_key)] = by_index[idx]
    return out


def ddae_grid_features(
        model: nn.Module,
        images: torch.Tensor,
        out_ks: Sequence[int],
        ts: Sequence[Union[int, float]],
        noise: bool = True,
        generator: Optional[torch.Generator] = None,
) -> FeatureDict:
    """DDAE's grid with DDAE's names: ``{(out_k, t): (B, C)}`` for 1-based decoder blocks ``out_k``.

    One forward pass per t; the input is noised at each t (DDAE's protocol) unless ``noise=False``.
    """
    feats = extract_features(model, images, layers=[k - 1 for k in out_ks], ts=ts, noise=noise, generator=generator)
    return {(layer + 1, t): f for (layer, t), f in feats.items()}
