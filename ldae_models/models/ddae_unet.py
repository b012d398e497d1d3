"""DDAE feature extractors: diffusion UNets tapped at a decoder block and a timestep.

Papers: "Denoising Diffusion Autoencoders are Unified Self-supervised Learners", W. Xiang et al.,
https://arxiv.org/abs/2303.09769, on the UNet of "Denoising Diffusion Probabilistic Models", J. Ho et al.,
https://arxiv.org/abs/2006.11239.

``UNet`` is one parametrised implementation of both backbones DDAE uses for CIFAR-10:

- DDPM (Ho et al.): base 128 channels, multipliers (1, 2, 2, 2), 2 residual blocks per level, attention at
  16x16, GroupNorm(32), SiLU, sinusoidal time embedding, convolutional down/up sampling: 35.7M parameters.
  Its computation is that of diffusers' ``UNet2DModel`` with google/ddpm-cifar10-32's configuration
  (sin-first frequencies with ``freq_shift=1``, GroupNorm eps 1e-6, asymmetric-pad stride-2 downsampling).
- DDPM++-style (DDAE's larger backbone): multipliers (2, 2, 2), 4 residual blocks per level, residual
  (BigGAN-style) down/up sampling, skip connections rescaled by 1/sqrt(2): about 56M parameters.

DDAE taps the output of every decoder block (a residual block and, at 16x16, its attention), named
``out_1 .. out_K`` from the deepest level up, pools it globally, and finds linearly separable features at a
small noise level. A registered model ``ddae_*`` returns the pooled feature of ``out_k`` (1-based, DDAE's
naming) of the input noised at ``t`` by the DDPM forward process (seedable); defaults are DDAE's best:
DDPM ``out_6`` (8x8, 256 channels) at t = 11. ``forward_intermediates`` / ``features_only`` give every
decoder block (0-based indices: ``out_k`` is index k - 1); ``unet.denoise(x_t, t)`` is the full noise
prediction and ``unet.training_loss`` DDPM's objective. ``schedule='edm'`` takes ``t`` as sigma and feeds
``c_in (x + sigma eps)`` with time input ``c_noise = ln(sigma) / 4``, for checkpoints trained the EDM way.
"""
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath
from timm.models import generate_default_cfgs
from timm.models._features import FeatureInfo, feature_take_indices

from ..layers.embed import sinusoidal_embedding
from ..layers.schedules import NoiseSchedule, TimestepLike, create_schedule
from ._builder import build_model, register_family
from .extractor import FeatureExtractor, is_fx_tracing

__all__ = ['UNet', 'DDAEUNet', 'unet_diffusers_to_ddae', 'UNET_CONFIGS']



class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> [resample] -> conv, + time projection, GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float, dropout: float = 0.0,
                 resample: Optional[str] = None, skip_rescale: bool = False) -> None:
        super().__init__()
        self.resample = resample  # None, 'up' or 'down' (residual resampling of DDPM++)
        self.skip_rescale = skip_rescale
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.drop_path: nn.Module = nn.Identity()  # stochastic depth of the residual branch (UNet's drop_path_rate)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == 'up':
            return F.interpolate(x, scale_factor=2.0, mode='nearest')
        if self.resample == 'down':
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h) + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        out = self.skip(x) + self.drop_path(h)
        return out / math.sqrt(2.0) if self.skip_rescale else out


class SelfAttention2d(nn.Module):
    """Single-head spatial self-attention with GroupNorm and a residual connection (Ho et al.)."""

    def __init__(self, ch: int, groups: int, eps: float, skip_rescale: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.q, self.k, self.v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.proj = nn.Linear(ch, ch)
        self.attn_drop, self.proj_drop = attn_drop, nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = F.scaled_dot_product_attention(self.q(h)[:, None], self.k(h)[:, None], self.v(h)[:, None],
                                           dropout_p=self.attn_drop if self.training else 0.0)[:, 0]
        out = x + self.proj_drop(self.proj(h)).transpose(1, 2).reshape(B, C, H, W)
        return out / math.sqrt(2.0) if self.skip_rescale else out


class ResAttBlock(nn.Module):
    """A residual block followed by attention at the attention resolutions: DDAE's tapped unit."""

    def __init__(self, res: ResBlock, attn: Optional[SelfAttention2d]) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, temb))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel right and bottom (Ho et al., diffusers padding=0)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class _Level(nn.Module):
    def __init__(self, blocks: List[ResAttBlock], resample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class UNet(nn.Module):
    """The DDPM / DDPM++ UNet: ``unet.denoise(x_t, t)`` predicts the noise."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 32,   # input resolution (square)
            in_chans: int = 3,                            # image channels
            out_chans: int = 3,                           # predicted-noise channels
            base_channels: int = 128,                     # channels at the first level
            channel_mult: Sequence[int] = (1, 2, 2, 2),   # per-level multipliers of base_channels
            num_res_blocks: int = 2,                      # residual blocks per encoder level (+1 per decoder level)
            attn_resolutions: Sequence[int] = (16,),      # resolutions (pixels) that get self-attention
            dropout: float = 0.0,                         # dropout inside residual blocks (training)
            norm_groups: int = 32,                        # GroupNorm groups
            norm_eps: float = 1e-6,                       # GroupNorm eps
            resample: str = 'conv',                       # 'conv' (DDPM) or 'resblock' (DDPM++)
            skip_rescale: bool = False,                   # divide residual sums by sqrt(2) (DDPM++)
            time_freq_shift: float = 1.0,                 # sinusoid frequencies over (half - shift)
            time_flip_sin_to_cos: bool = False,           # cos first instead of sin first
            schedule: Union[str, NoiseSchedule] = 'ddpm',  # what t means: 'ddpm' (a step) or 'edm' (sigma)
            schedule_args: Optional[Dict[str, Any]] = None,  # the schedule's arguments
            drop_path_rate: float = 0.0,                  # stochastic depth of the residual blocks, rising to this
            attn_drop_rate: float = 0.0,                  # dropout of the attention weights
            proj_drop_rate: float = 0.0,                  # dropout after the attention projection
            pos_drop_rate: float = 0.0,                   # timm's ViT flags: a UNet has no position embedding
            patch_drop_rate: float = 0.0,                 # ... and no patch tokens: refused unless 0
            drop_block_rate: Optional[float] = None,      # ... timm's DropBlock: refused unless 0 / None
    ) -> None:
        super().__init__()
        for flag, value, why in (('pos_drop_rate', pos_drop_rate, 'has no position embedding'),
                                 ('patch_drop_rate', patch_drop_rate, 'has no patch tokens'),
                                 ('drop_block_rate', drop_block_rate, 'has no DropBlock')):
            if value:
                raise ValueError(f'{flag}={value}: the UNet {why}; it takes drop_path_rate (stochastic depth of its '
                                 f'residual blocks), dropout (inside them), attn_drop_rate, proj_drop_rate, drop_rate')
        if resample not in ('conv', 'resblock'):
            raise ValueError(f"resample must be 'conv' or 'resblock', got {resample!r}")
        if not isinstance(img_size, int):
            if len(set(img_size)) != 1:
                raise ValueError(f'the UNet takes square images, got img_size={tuple(img_size)}')
            img_size = int(img_size[0])
        self.img_size = img_size
        self.in_chans = in_chans
        self.base_channels = base_channels
        self.time_freq_shift = time_freq_shift
        self.time_flip_sin_to_cos = time_flip_sin_to_cos
        self.schedule = create_schedule(schedule, **(schedule_args or {}))
        temb_ch = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_chans, base_channels, 3, padding=1)

        res_blocks: List[ResBlock] = []  # in execution order, for stochastic depth

        def res(i: int, o: int, rs: Optional[str] = None) -> ResBlock:
            res_blocks.append(ResBlock(i, o, temb_ch, norm_groups, norm_eps, dropout, resample=rs,
                                       skip_rescale=skip_rescale))
            return res_blocks[-1]

        def attn(ch: int, r: int) -> Optional[SelfAttention2d]:
            return (SelfAttention2d(ch, norm_groups, norm_eps, skip_rescale, attn_drop_rate, proj_drop_rate)
                    if r in attn_resolutions else None)

        chans, ch, r = [base_channels], base_channels, img_size
        self.down = nn.ModuleList()
        for lvl, mult in enumerate(channel_mult):
            out = base_channels * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResAttBlock(res(ch, out), attn(out, r)))
                ch = out
                chans.append(ch)
            down = None
            if lvl != len(channel_mult) - 1:
                down = Downsample(ch) if resample == 'conv' else res(ch, ch, 'down')
                chans.append(ch)
                r //= 2
            self.down.append(_Level(blocks, down))
        self.mid = nn.ModuleList([ResAttBlock(res(ch, ch), SelfAttention2d(ch, norm_groups, norm_eps, skip_rescale,
                                                                            attn_drop_rate, proj_drop_rate)),
                                  ResAttBlock(res(ch, ch), None)])
        self.up = nn.ModuleList()  # deepest level first, in execution order
        self.block_info: List[Dict[str, Any]] = []  # one entry per decoder block: channels and resolution
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            out = base_channels * mult
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResAttBlock(res(ch + chans.pop(), out), attn(out, r)))
                ch = out
                self.block_info.append(dict(num_chs=out, resolution=r, reduction=img_size // r))
            up = None
            if lvl != 0:
                up = Upsample(ch) if resample == 'conv' else res(ch, ch, 'up')
                r *= 2
            self.up.append(_Level(blocks, up))
        self.norm_out: Optional[nn.Module] = nn.GroupNorm(norm_groups, ch, eps=norm_eps)
        self.conv_out: Optional[nn.Module] = nn.Conv2d(ch, out_chans, 3, padding=1)
        self.grad_checkpointing = False
        if drop_path_rate > 0:  # rising linearly over the residual blocks in the order they run, as timm's nets
            for i, blk in enumerate(res_blocks):
                blk.drop_path = DropPath(drop_path_rate * i / max(1, len(res_blocks) - 1))

    @property
    def decoder_blocks(self) -> List[ResAttBlock]:
        """The tapped decoder blocks ``out_1 .. out_K`` (index k - 1)."""
        return [b for level in self.up for b in level.blocks]

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(t, self.base_channels, self.time_flip_sin_to_cos, self.time_freq_shift)
        return self.time_mlp(emb.to(self.conv_in.weight.dtype))

    def _run(self, x: torch.Tensor, t: torch.Tensor, stop_after: Optional[int] = None
             ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        """Full pass (or up to decoder block ``stop_after``, 0-based): (noise prediction or None, decoder outputs)."""
        temb = self.time_embedding(t.reshape(-1).to(x.device).expand(x.shape[0]))
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for blk in level.blocks:
                h = self._block(blk, h, temb)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h, temb)
                skips.append(h)
        for blk in self.mid:
            h = self._block(blk, h, temb)
        outs: List[torch.Tensor] = []
        for level in self.up:
            for blk in level.blocks:
                h = self._block(blk, torch.cat([h, skips.pop()], dim=1), temb)
                outs.append(h)
                if stop_after is not None and len(outs) > stop_after:
                    return None, outs
            if level.resample is not None:
                h = level.resample(h, temb)
        if self.conv_out is None:  # pruned after its last tap
            return None, outs
        return self.conv_out(F.silu(self.norm_out(h))), outs

    def _block(self, blk: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(blk, h, temb, use_reentrant=False)
        return blk(h, temb)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (less memory, more time)."""
        self.grad_checkpointing = enable

    def input_size(self) -> Tuple[int, int, int]:
        return (self.in_chans, self.img_size, self.img_size)

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f'expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})')
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f'expected {self.img_size}x{self.img_size} images, got {x.shape[-2]}x{x.shape[-1]}')

    def _denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.conv_out is None:
            raise ValueError('this UNet was pruned after its last tap (prune_intermediate_layers): it no longer predicts '
                             'noise; use the whole model (ldae_models.full_model) to denoise')
        x_in, t_in = self.schedule.network_input(x_t, t)
        return self._run(x_in, t_in)[0]

    def denoise(self, x_t: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """The UNet's noise prediction for ``x_t`` at timestep(s) ``t`` of its schedule (a DDPM step index)."""
        self.check_input(x_t)
        return self._denoise(x_t, self.schedule.timesteps(t, x_t.shape[0], x_t.device))

    def noise_shape(self, images: torch.Tensor) -> Tuple[int, ...]:
        return tuple(images.shape[1:])

    def training_loss(self, images: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """DDPM's objective (Ho et al.): the mean squared error of the predicted noise, t from ``schedule.sample_t``."""
        if self.schedule.name != 'ddpm':
            raise NotImplementedError(f'the UNets train with the DDPM objective; schedule {self.schedule.name!r} is for '
                                      f'feature extraction from checkpoints trained elsewhere')
        x_t, noise = self.schedule.add_noise(images, t, noise=noise)
        return F.mse_loss(self._denoise(x_t, t).float(), noise.float())


class DDAEUNet(FeatureExtractor, UNet):
    """A UNet used as a DDAE feature extractor: pooled ``out_k`` features at a fixed noise level."""

    fx_reason = ('its noisy input is drawn from a torch.Generator, which a symbolic trace cannot follow: create it '
                 'with noisy_input=False to trace it (the input is then taken as it is, clean or noised beforehand)')

    @property
    def fx_traceable(self) -> bool:
        """torch.fx traces it when its input is taken as it is (``noisy_input=False``); its checks are skipped then."""
        return not self.noisy_input

    def __init__(
            self,
            *args: Any,
            out_k: int = 6,                    # tapped decoder block, 1-based as in DDAE
            t: float = 11,                     # DDPM step (or EDM sigma) of the features
            noisy_input: bool = True,          # noise the input at t first (DDAE's protocol) or feed it as it is
            num_classes: int = 0,              # optional linear head on the pooled feature
            global_pool: str = 'avg',          # 'avg' (mean over the map) or '' (forward returns the map)
            noise_seed: int = 0,               # seeds the noisy input of an eval-mode forward (deterministic)
            tap_only: bool = True,             # keep the decoder up to out_k only (what forward uses); False: the
                                               # whole UNet (denoise, taps past out_k), as full_model builds it
            drop_rate: float = 0.0,            # dropout before the head (timm's)
            **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if global_pool == '' and num_classes > 0:
            raise ValueError("a linear head needs pooled features: global_pool='' takes num_classes=0")
        self.noisy_input = noisy_input
        self.global_pool = global_pool
        self.noise_seed = noise_seed
        self.generator: Optional[torch.Generator] = None
        self.kept_blocks: Optional[int] = None  # set by prune_intermediate_layers
        K = len(self.block_info)
        if not 1 <= out_k <= K:
            raise ValueError(f'out_k must be in [1, {K}] (DDAE numbers decoder blocks from 1), got {out_k}')
        self.out_k = out_k
        self.t = float(self.schedule.timesteps(t, 1, 'cpu')[0])
        self.num_features = self.head_hidden_size = self.block_info[out_k - 1]['num_chs']
        self.num_classes = num_classes
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        paths = [f'up.{i}.blocks.{j}' for i, level in enumerate(self.up) for j in range(len(level.blocks))]
        self.feature_info = [dict(module=path, num_chs=b['num_chs'], reduction=b['reduction'])
                             for path, b in zip(paths, self.block_info)]
        self.pruned_prefixes: List[str] = []  # the state-dict prefixes of what pruning removed
        if tap_only:
            self._prune_after(out_k - 1)

    # -- the encoder contract ----------------------------------------------------------------------------------
    @property
    def blocks(self) -> List[ResAttBlock]:
        return self.decoder_blocks

    @property
    def default_layer(self) -> int:
        return self.out_k - 1

    def encode_input(self, images: torch.Tensor) -> torch.Tensor:
        self.check_input(images)
        return images

    def tap(self, x: torch.Tensor, t: Optional[torch.Tensor], indices: List[int]) -> List[torch.Tensor]:
        x_in, t_in = self.schedule.network_input(x, t)
        outs = self._run(x_in, t_in, stop_after=max(indices))[1]
        return [outs[i] for i in indices]

    # -- timm API ----------------------------------------------------------------------------------------------
    def forward_intermediates(self, x: torch.Tensor, t: TimestepLike = None,
                              indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
                              noisy_input: Optional[bool] = None, generator: Optional[torch.Generator] = None):
        """Decoder block outputs at ``indices`` (0-based: out_k is k - 1), NCHW, for the input at ``t``.

        ``noisy_input`` (default: the model's setting) noises the input first; with ``noisy_input=False`` it is passed
        as it is, already noisy or clean.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"a UNet's intermediates are feature maps: output_fmt must be 'NCHW', got {output_fmt!r}")
        noisy = self.noisy_input if noisy_input is None else noisy_input
        if is_fx_tracing():  # a trace: the model's t as a constant (1,), broadcast over the batch; no check, no noise
            if noisy:
                raise ValueError(f'{type(self).__name__}: {self.fx_reason}')
            t = self.schedule.timesteps(self.t, 1, 'cpu')
        else:
            x = self.encode_input(x)
            t = self.schedule.timesteps(self.t if t is None else t, x.shape[0], x.device)
        take, max_index = feature_take_indices(self.num_taps, indices)
        if noisy:
            x = self.noise_input(x, t, generator=self._noise_generator(x, generator))[0]
        x_in, t_in = self.schedule.network_input(x, t)
        tap = self.out_k - 1
        stop = max_index if intermediates_only else max(max_index, tap)
        _, outs = self._run(x_in, t_in, stop_after=stop)
        inter = [outs[i] for i in take]
        return inter if intermediates_only else (outs[tap], inter)  # the final map is the tapped one

    def _noise_generator(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
        """The generator of the noisy input: the one given, else the model's; in eval mode without either, a fresh one
        seeded by ``noise_seed``, so that an eval-mode forward of the same batch gives the same features."""
        generator = generator or self.generator
        if generator is None and not self.training and x.device.type != 'meta':  # meta: no values to seed
            generator = torch.Generator(x.device).manual_seed(self.noise_seed)
        return generator

    def pool_size(self) -> Tuple[int, int]:
        """(h, w) of the map ``forward_features`` returns (the ``out_k`` block's), for the pretrained cfg."""
        r = self.block_info[self.out_k - 1]['resolution']
        return (r, r)

    def _layers_hint(self) -> str:
        if not self.pruned_prefixes:
            return ''
        return (f'; this extractor keeps the decoder up to its tap (out_k={self.out_k}): create it with tap_only=False '
                f'(ldae_models.full_model; on the command line --full) for the later blocks')

    @property
    def num_taps(self) -> int:
        return len(self.block_info) if self.kept_blocks is None else self.kept_blocks

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Keep the decoder up to the last block of ``indices`` (and ``out_k``): the later decoder blocks, their
        upsamplers and the output layers are deleted, so the model no longer predicts noise (``denoise``)."""
        take, max_index = feature_take_indices(self.num_taps, indices)
        self._prune_after(max(max_index, self.out_k - 1))
        if prune_head:
            self.reset_classifier(0)
        return take

    def _prune_after(self, last: int) -> None:
        """Delete what runs after decoder block ``last`` (0-based): later blocks, upsamplers, the output layers."""
        keep, seen = last + 1, 0
        for i, level in enumerate(self.up):
            n = len(level.blocks)
            if seen + n > keep:
                self.pruned_prefixes += [f'up.{i}.blocks.{j}.' for j in range(max(0, keep - seen), n)]
                del level.blocks[max(0, keep - seen):]
            if seen + n >= keep and level.resample is not None:
                self.pruned_prefixes.append(f'up.{i}.resample.')
                level.resample = None
            seen += n
        self.up = nn.ModuleList([lv for lv in self.up if len(lv.blocks)])  # a suffix of levels: indices unchanged
        if self.conv_out is not None:
            self.pruned_prefixes += ['norm_out.', 'conv_out.']
        self.norm_out = self.conv_out = None
        self.kept_blocks = keep
        self.feature_info = self.feature_info[:keep]

    def forward_features(self, x: torch.Tensor, t: TimestepLike = None, generator: Optional[torch.Generator] = None
                         ) -> torch.Tensor:
        """The feature map of ``out_k`` (B, C, h, w)."""
        return self.forward_intermediates(x, t, indices=[self.out_k - 1], intermediates_only=True,
                                          generator=generator)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, t: TimestepLike = None, generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, t, generator))

    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()  # no position embedding or tokens: norms and biases are 1-D, spared by the optimizer already

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Layer groups for layer-wise lr decay (timm's ``param_groups_layer_decay``), in the order the UNet runs: the
        stem (time MLP, input conv), each encoder level's blocks, the mid blocks, each decoder block, the head."""
        if coarse:
            return dict(stem=r'^time_mlp|^conv_in', blocks=[(r'^down\.(\d+)', None), (r'^mid', (99990,)),
                                                          (r'^up\.(\d+)', (99991,)), (r'^norm_out|^conv_out', (99999,))])
        return dict(stem=r'^time_mlp|^conv_in',
                    blocks=[(r'^down\.(\d+)\.blocks\.(\d+)', None), (r'^down\.(\d+)\.resample', (99980,)),
                            (r'^mid\.(\d+)', (99990,)), (r'^up\.(\d+)\.blocks\.(\d+)', (99991,)),
                            (r'^up\.(\d+)\.resample', (99992,)), (r'^norm_out|^conv_out', (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head of ``num_classes`` (0: none) on the model's device and dtype; ``global_pool`` 'avg' or ''."""
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        if self.global_pool == '' and num_classes > 0:
            raise ValueError("a linear head needs pooled features: global_pool='' takes num_classes=0")
        self.num_classes = num_classes
        w = self.conv_in.weight
        self.head = (nn.Linear(self.num_features, num_classes, device=w.device, dtype=w.dtype) if num_classes > 0
                     else nn.Identity())

    def features_only_net(self, out_indices: Optional[Sequence[int]], feature_cls: Optional[str] = None) -> nn.Module:
        """timm's ``features_only``: the decoder maps of ``out_indices`` (default every other block up to the tap: 1,
        3, 5 for out_6), from ``forward_intermediates``, or from a torch.fx graph (``feature_cls='fx'``)."""
        default = tuple(range(self.num_taps))[1::2]
        indices = default if out_indices is None else out_indices
        return DecoderGraphFeatures(self, indices) if feature_cls == 'fx' else DecoderFeatures(self, indices)


class DecoderFeatureInfo(FeatureInfo):
    """timm's ``FeatureInfo`` without its check that reductions never decrease: a decoder's do."""

    def __init__(self, feature_info: List[Dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.out_indices = tuple(out_indices)
        self.info = feature_info


class DecoderFeatures(nn.Module):
    """``features_only`` for a DDAE UNet: the feature maps of the decoder blocks ``out_indices`` (0-based)."""

    def __init__(self, model: DDAEUNet, out_indices: Union[int, Sequence[int]] = (1, 3, 5)) -> None:
        super().__init__()
        # timm's rules over the blocks the model keeps: negative indices count from its last, an int n is the last n
        take, _ = feature_take_indices(model.num_taps, out_indices if isinstance(out_indices, int) else
                                       list(out_indices))
        model.reset_classifier(0)
        self.model = model
        self.out_indices = tuple(take)
        self.feature_info = DecoderFeatureInfo([dict(fi) for fi in model.feature_info], self.out_indices)

    def forward(self, x: torch.Tensor, t: Any = None, generator: Optional[torch.Generator] = None
                ) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, t, indices=list(self.out_indices), intermediates_only=True,
                                                generator=generator)


class DecoderGraphFeatures(nn.Module):
    """``features_only`` with ``feature_cls='fx'``: the same maps as ``DecoderFeatures``, from a torch.fx graph of the
    UNet (timm's ``create_feature_extractor``; needs ``noisy_input=False``)."""

    def __init__(self, model: DDAEUNet, out_indices: Union[int, Sequence[int]]) -> None:
        super().__init__()
        from timm.layers._fx import create_feature_extractor
        take, _ = feature_take_indices(model.num_taps, out_indices if isinstance(out_indices, int) else
                                       list(out_indices))
        model.reset_classifier(0)
        self.out_indices = tuple(take)
        self.feature_info = DecoderFeatureInfo([dict(fi) for fi in model.feature_info], self.out_indices)
        self.graph_module = create_feature_extractor(model, {model.feature_info[i]['module']: str(i) for i in take})

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.graph_module(x).values())


# -- converter ----------------------------------------------------------------------------------------------

_RES_NAMES = {'time_emb_proj': 'temb_proj', 'conv_shortcut': 'skip', 'nin_shortcut': 'skip'}
_ATTN_NAMES = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj',
               'query': 'q', 'key': 'k', 'value': 'v', 'proj_attn': 'proj'}  # new and pre-0.13 diffusers names


def unet_diffusers_to_ddae(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """diffusers ``UNet2DModel`` (google/ddpm-cifar10-32 layout, old or new attention names) -> ``UNet``."""
    out = {}
    for k, v in sd.items():
        m = re.match(r'(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)', k)
        if m:
            side, lvl, kind, j, rest = m.groups()
            if kind == 'resnets':
                name = _RES_NAMES.get(rest.rsplit('.', 1)[0], rest.rsplit('.', 1)[0])
                out[f'{side}.{lvl}.blocks.{j}.res.{name}.{rest.rsplit(".", 1)[1]}'] = v
            elif kind == 'attentions':
                name = _ATTN_NAMES[rest.rsplit('.', 1)[0]]
                out[f'{side}.{lvl}.blocks.{j}.attn.{name}.{rest.rsplit(".", 1)[1]}'] = _as_linear(v)
            else:
                out[f'{side}.{lvl}.resample.{rest}'] = v
            continue
        m = re.match(r'mid_block\.(resnets|attentions)\.(\d+)\.(.+)', k)
        if m:
            kind, j, rest = m.groups()
            base, p = rest.rsplit('.', 1)
            if kind == 'resnets':
                out[f'mid.{j}.res.{_RES_NAMES.get(base, base)}.{p}'] = v
            else:
                out[f'mid.0.attn.{_ATTN_NAMES[base]}.{p}'] = _as_linear(v)
            continue
        k = k.replace('time_embedding.linear_1', 'time_mlp.0').replace('time_embedding.linear_2', 'time_mlp.2')
        out[k.replace('conv_norm_out', 'norm_out')] = v
    return out


def _as_linear(v: torch.Tensor) -> torch.Tensor:
    return v[:, :, 0, 0] if v.dim() == 4 else v  # some old checkpoints store attention projections as 1x1 convs


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """An unwrapped state dict (DDAE's ``{'MODEL', 'EMA', 'opt'}`` unwraps to its EMA) in diffusers' ``UNet2DModel``
    layout or ours -> ours."""
    if any(k.startswith(('down_blocks.', 'mid_block.')) for k in state_dict):
        state_dict = unet_diffusers_to_ddae(state_dict)
    pruned = tuple(getattr(model, 'pruned_prefixes', ()))
    if pruned:  # a tapped extractor: the checkpoint's decoder past the tap is not part of it
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(pruned)}
    return state_dict


# -- configurations and registration ----------------------------------------------------------------------

UNET_CONFIGS: Dict[str, Dict[str, Any]] = {
    # Ho et al.'s CIFAR-10 UNet (google/ddpm-cifar10-32); DDAE's best tap: out_6 at t = 11.
    'ddae_ddpm_cifar10_32': dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                                 resample='conv', out_k=6, t=11),
    # DDAE's DDPM++-style UNet, trained with the DDPM objective; best tap out_6 at t = 11.
    'ddae_ddpmpp_cifar10_32': dict(base_channels=128, channel_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
                                   resample='resblock', skip_rescale=True, out_k=6, t=11),
}


def _create_ddae_unet(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return build_model(DDAEUNet, variant, pretrained, {**UNET_CONFIGS[variant], **kwargs},
                       filter_fn=checkpoint_filter_fn)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 0, 'input_size': (3, 32, 32), 'pool_size': None, 'crop_pct': 1.0,
        'interpolation': 'bicubic', 'fixed_input_size': True, 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'conv_in', 'classifier': 'head',
        'paper_ids': ('arXiv:2303.09769', 'arXiv:2006.11239'),
        'paper_name': 'Denoising Diffusion Autoencoders are Unified Self-supervised Learners',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # Ho et al.'s released CIFAR-10 DDPM (FID 3.17), in diffusers' UNet2DModel layout; converted on load.
    'ddae_ddpm_cifar10_32.google': _cfg(
        hf_hub_id='google/ddpm-cifar10-32', hf_hub_filename='diffusion_pytorch_model.safetensors',
        license='apache-2.0', origin_url='https://huggingface.co/google/ddpm-cifar10-32',
        notes=('Ho et al. DDPM trained on CIFAR-10 train (unconditional), ported to diffusers by Google',)),
    'ddae_ddpmpp_cifar10_32': _cfg(),
})

def create_unet(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, **kwargs: Any) -> DDAEUNet:
    """The whole UNet of ``name`` (every decoder block, the noise prediction: ``denoise``, training), optionally with
    weights; ``timm.create_model`` gives the extractor, which keeps the decoder up to its tap."""
    from ._builder import load_model
    kwargs.setdefault('tap_only', False)
    return load_model(name, pretrained=pretrained or bool(checkpoint), checkpoint=checkpoint, **kwargs)


register_family('ddae', __name__, {n: n for n in UNET_CONFIGS}, _create_ddae_unet, full_model=create_unet, docs={
    'ddae_ddpm_cifar10_32': "Ho et al.'s CIFAR-10 DDPM UNet (35.7M) tapped at out_6, t = 11.",
    'ddae_ddpmpp_cifar10_32': "DDAE's DDPM++-style CIFAR-10 UNet (about 56M) tapped at out_6, t = 11.",
})
