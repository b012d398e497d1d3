"""Conditional adaLN ViT encoders and their merge into a plain timm ``VisionTransformer``.

``AdaLNViT`` is the encoder half of a DiT-style denoiser: patch embedding, fixed 2-D sin-cos positions (no class
token), a stack of adaLN-Zero blocks conditioned on a timestep embedding, global average pool and an optional linear
head. It is the base of the l-DAE encoders (``ldae_vit.py``) and the DiT encoders (``dit.py``).

With the timestep fixed, the conditioning vector ``c`` is a constant, so every block's modulation is a constant and
folds into ordinary weights (l-DAE, App. A, and the spec's item 7)::

    LN(x) * (1 + scale) + shift  ==  LayerNorm(weight=1 + scale, bias=shift)(x)
    gate * (W h + b)             ==  Linear(weight=gate[:, None] * W, bias=gate * b)(h)

``AdaLNViT.merge(t)`` computes the modulation in float64 and folds it into a ``MergedViT``: a timm
``VisionTransformer`` (no class token, average pool, GELU-tanh, LayerNorm eps 1e-6, no final norm) with the same
outputs, which also answers the encoder contract at its one t. A merged model without weights needs no fold:
``merged_skeleton()`` initialises the ViT as the fold of a fresh adaLN-Zero encoder would be (identity blocks).
"""
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchDropout, PatchEmbed, resample_abs_pos_embed
from timm.models import VisionTransformer
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from ..layers.blocks import AdaLNBlock, LN_EPS, init_dit_weights
from ..layers.embed import TimestepEmbedder, sincos_pos_embed_2d
from ..layers.schedules import NoiseSchedule, TimestepLike, create_schedule
from .extractor import FeatureExtractor, is_fx_tracing

__all__ = ['AdaLNViT', 'MergedViT']


def _tokens_to_maps(tokens: List[torch.Tensor], grid: Tuple[int, int]) -> List[torch.Tensor]:
    """[(B, N, C)] -> [(B, C, h, w)]."""
    h, w = grid
    return [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in tokens]


class MergedViT(FeatureExtractor, VisionTransformer):
    """A timm ``VisionTransformer`` that is an adaLN encoder folded at one timestep ``t``.

    Its forward, weights and every timm API are the ViT's; ``vit_args`` rebuilds it with timm alone (``export_timm``);
    ``extract_features`` answers at ``t`` only. ``noise_is_schedule_only`` says whether it can add the training noise itself (a
    DiT's DDPM noise can be; l-DAE's latent noise needs the PCA tokenizer, which stays with the conditional encoder).
    """

    fixed_t = True
    fx_traceable = True  # forward is timm's ViT's: torch.fx traces it, TorchScript scripts it
    # plain Python attributes that TorchScript must not try to compile (the encoder contract uses them, forward not)
    __jit_ignored_attributes__ = ['schedule', 'vit_args', 'input_hint', 'noise_is_schedule_only', 'pretrained_cfg', 'default_cfg',
                                  '_model_args']

    def __init__(self, vit_args: Dict[str, Any], t: float, schedule: NoiseSchedule, noise_is_schedule_only: bool,
                 input_hint: str = '') -> None:
        super().__init__(**vit_args)
        self.vit_args = dict(vit_args)
        self.t = float(t)
        self.schedule = schedule
        self.noise_is_schedule_only = noise_is_schedule_only
        self.input_hint = input_hint  # appended to the error for input of the wrong channels (a DiT's: use the VAE)

    def encode_input(self, images: torch.Tensor) -> torch.Tensor:
        """Check the input with a message that names the problem (timm's ViT asserts)."""
        if images.dim() != 4 or images.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(f'expected images of shape (B, {self.patch_embed.proj.in_channels}, H, W), got '
                             f'{tuple(images.shape)}{self.input_hint}')
        if not self.dynamic_img_size and tuple(images.shape[-2:]) != tuple(self.patch_embed.img_size):
            h, w = self.patch_embed.img_size
            raise ValueError(f'expected {h}x{w} inputs, got {images.shape[-2]}x{images.shape[-1]}{self.input_hint}')
        return images

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Eager calls check the input with a message that names the problem (timm's ViT asserts). The check lives
        # here, not in forward, so that forward is timm's own: torch.fx traces it and TorchScript scripts it.
        if args and torch.is_tensor(args[0]) and not is_fx_tracing():
            self.encode_input(args[0])
        return super().__call__(*args, **kwargs)

    def noise_input(self, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.noise_is_schedule_only:
            raise ValueError("a merged l-DAE encoder does not carry its PCA tokenizer, so it cannot add l-DAE's "
                             "latent noise: create it with merged=False for noisy input")
        return super().noise_input(x, t, noise=noise, generator=generator)

    def tap(self, x: torch.Tensor, t: Optional[torch.Tensor], indices: List[int]) -> List[torch.Tensor]:
        return self.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True)

    @torch.no_grad()
    def init_like_adaln_zero(self) -> 'MergedViT':
        """The weights a fold of a freshly initialised adaLN-Zero encoder has: xavier qkv and fc1, zero biases,
        unit LayerNorms, and zero attention and MLP outputs (every block starts as the identity)."""
        for blk in self.blocks:
            for lin in (blk.attn.qkv, blk.mlp.fc1):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            for lin in (blk.attn.proj, blk.mlp.fc2):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            for norm in (blk.norm1, blk.norm2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size)[None])
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        return self


class AdaLNViT(FeatureExtractor, nn.Module):
    """Timestep-conditioned ViT encoder made of DiT blocks.

    ``model(x, t=None)`` returns pooled features (or logits when ``num_classes > 0``); ``t`` defaults to the fixed
    ``t`` given at construction, and means what the schedule says (a step index in [0, T) for every schedule here).
    """

    default_t = 10.0  # the paper's transfer t (l-DAE); DiTEncoder uses DDAE's 121
    fx_traceable = False
    fx_reason = ('the conditional encoder checks its input and its t in Python (a t out of range is refused with a '
                 'message), which a symbolic trace cannot follow')

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 256,   # input resolution (square if int)
            patch_size: int = 16,                          # p, pixels per patch side
            in_chans: int = 3,                             # image channels
            num_classes: int = 0,                          # 0: no head, model(x) returns pooled features
            global_pool: str = 'avg',                      # 'avg' (token mean) or '' (no pooling)
            embed_dim: int = 768,                          # token width W
            depth: int = 12,                               # encoder blocks
            num_heads: int = 12,                           # attention heads
            mlp_ratio: float = 4.0,                        # MLP hidden = mlp_ratio * W
            adaln_hidden_ratio: Optional[float] = 0.25,    # l-DAE: 2-layer modulation MLP with W/4 hidden
            t: Optional[float] = None,                     # fixed timestep (None: the schedule's, else default_t)
            schedule: Union[str, NoiseSchedule] = 'linear_sigma',  # what t means and how the input is noised
            schedule_args: Optional[Dict[str, Any]] = None,        # the schedule's arguments (e.g. sigma_max)
            noisy_input: bool = False,                     # forward noises the input at t first
            dynamic_img_size: bool = False,                # accept other sizes, resampling positions
            drop_rate: float = 0.0,                        # dropout before the head
            mlp_norm_eps: float = LN_EPS,                  # eps of each block's norm2
            drop_path_rate: float = 0.0,                   # stochastic depth, 0 at the first block to this at the last
            attn_drop_rate: float = 0.0,                   # dropout of the attention weights
            proj_drop_rate: float = 0.0,                   # dropout after the attention and MLP projections
            pos_drop_rate: float = 0.0,                    # dropout of the tokens after the position embedding
            patch_drop_rate: float = 0.0,                  # share of patch tokens dropped in training (timm's)
            drop_block_rate: Optional[float] = None,       # timm's flag for convolutional nets: refused here
    ) -> None:
        super().__init__()
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if drop_block_rate:
            raise ValueError(f'drop_block_rate={drop_block_rate}: DropBlock is for convolutional feature maps; a ViT '
                             f'takes drop_path_rate (stochastic depth), drop_rate, attn_drop_rate, proj_drop_rate')
        self.schedule = create_schedule(schedule, **(schedule_args or {}))
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.dynamic_img_size = dynamic_img_size
        self.in_chans = in_chans
        self.noisy_input = noisy_input
        self.grad_checkpointing = False
        self.generator: Optional[torch.Generator] = None  # seeds forward's noise when noisy_input
        self._arch_args: Dict[str, Any] = dict(
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        # regularisation in training, timm's ViT's arguments (the merged ViT gets the same)
        self._drop_args: Dict[str, float] = dict(
            drop_rate=drop_rate, drop_path_rate=drop_path_rate, attn_drop_rate=attn_drop_rate,
            proj_drop_rate=proj_drop_rate, pos_drop_rate=pos_drop_rate, patch_drop_rate=patch_drop_rate)

        embed_args = dict(strict_img_size=False, output_fmt='NHWC') if dynamic_img_size else {}
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, **embed_args)
        # Fixed sin-cos positions: a buffer kept in the state dict (DiT stores it too).
        self.register_buffer('pos_embed', sincos_pos_embed_2d(embed_dim, self.patch_embed.grid_size)[None])  # (1,N,W)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.patch_drop = PatchDropout(patch_drop_rate, num_prefix_tokens=0) if patch_drop_rate > 0 else nn.Identity()
        self.t_embedder = TimestepEmbedder(embed_dim)
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # rising with depth, as timm's ViT
        self.blocks = nn.ModuleList([
            AdaLNBlock(embed_dim, num_heads, mlp_ratio, adaln_hidden_ratio=adaln_hidden_ratio, mlp_norm_eps=mlp_norm_eps,
                       drop_path=dpr[i], attn_drop=attn_drop_rate, proj_drop=proj_drop_rate)
            for i in range(depth)])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        if t is None:
            t = self.schedule.default_t if self.schedule.default_t is not None else self.default_t
        self.t = float(self.schedule.timesteps(t, 1, 'cpu')[0])
        self.init_weights()

    # -- initialisation ----------------------------------------------------------------------------
    def init_weights(self) -> None:
        """DiT's scheme: xavier Linears, xavier patch embed, N(0, 0.02) timestep MLP, zero adaLN outputs and head."""
        init_dit_weights(self, self.patch_embed.proj, self.t_embedder)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def input_size(self) -> Tuple[int, int, int]:
        """(C, H, W) of the input, for the pretrained cfg (timm's data pipeline reads it)."""
        return (self.in_chans, *self.patch_embed.img_size)

    # -- the encoder contract ----------------------------------------------------------------------
    @property
    def noise_is_schedule_only(self) -> bool:
        """Whether the training noise is the schedule's, on the input itself (a merged copy can then add it)."""
        return True

    def encode_input(self, images: torch.Tensor) -> torch.Tensor:
        self.check_input(images)
        return images

    def tap(self, x: torch.Tensor, t: Optional[torch.Tensor], indices: List[int]) -> List[torch.Tensor]:
        return _tokens_to_maps(self._run(x, t, take=indices, stop=max(indices) + 1)[1], self.grid_size(x))

    # -- conditioning ------------------------------------------------------------------------------
    def condition(self, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The conditioning vector ``c`` (B, W) for a checked (B,) t (subclasses add other inputs)."""
        if cond:
            raise TypeError(f'{type(self).__name__} takes no conditioning besides t, got {sorted(cond)}')
        return self.t_embedder(t)

    # -- input -------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem when ``x`` is not a batch of images this model accepts."""
        if x.dim() != 4:
            raise ValueError(f'expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})'
                             + self._channel_hint())
        H, W = x.shape[-2:]
        p = self.patch_embed.patch_size
        if self.dynamic_img_size:
            if H % p[0] or W % p[1]:
                raise ValueError(f'image size {H}x{W} is not divisible by the patch size {p[0]}x{p[1]}')
        elif (H, W) != tuple(self.patch_embed.img_size):
            h0, w0 = self.patch_embed.img_size
            raise ValueError(f'expected {h0}x{w0} images, got {H}x{W}; build the model with '
                             f'dynamic_img_size=True (or img_size=...) for other sizes')

    def _channel_hint(self) -> str:
        return ''

    def grid_size(self, x: torch.Tensor) -> Tuple[int, int]:
        return self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, N, W) with positions (and, in training, timm's position dropout)."""
        x = self.patch_embed(x)
        if self.dynamic_img_size:  # same resampling as timm's ViT, so merged and conditional agree
            B, H, W, C = x.shape
            pos = resample_abs_pos_embed(self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                                         num_prefix_tokens=0)
            return self.pos_drop(x.view(B, -1, C) + pos)
        return self.pos_drop(x + self.pos_embed)

    def run_block(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(blk, x, c, use_reentrant=False)
        return blk(x, c)

    def _run(self, x: torch.Tensor, t: torch.Tensor, take: Sequence[int] = (), blocks: Optional[Sequence] = None,
             stop: Optional[int] = None, drop_patches: bool = False, **cond: Any) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Embed, condition on a checked (B,) t and run ``blocks`` (default: this encoder's), the first ``stop`` of
        them when given; returns (the last tokens, the tokens after each block in ``take``). ``drop_patches``: timm's
        patch dropout in training (pooled features only: maps need every token)."""
        blocks = list(self.blocks if blocks is None else blocks)[:stop]
        x = self.embed(x)
        if drop_patches:
            x = self.patch_drop(x)
        c = self.condition(t, **cond)
        out = []
        for i, blk in enumerate(blocks):
            x = self.run_block(blk, x, c)
            if i in take:
                out.append(x)
        return x, out

    def _prepare(self, x: torch.Tensor, t: TimestepLike, generator: Optional[torch.Generator]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Check the input, resolve t once, noise the input when ``noisy_input``."""
        x = self.encode_input(x)
        t = self.schedule.timesteps(self.t if t is None else t, x.shape[0], x.device)
        if self.noisy_input:
            x = self.noise_input(x, t, generator=generator or self.generator)[0]
        return x, t

    # -- forward -----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, t: TimestepLike = None, generator: Optional[torch.Generator] = None,
                         **cond: Any) -> torch.Tensor:
        """Images -> output tokens (B, N, W) of the last block (no final norm, as in l-DAE)."""
        x, t = self._prepare(x, t, generator)
        return self._run(x, t, drop_patches=True, **cond)[0]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1) if self.global_pool == 'avg' else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, t: TimestepLike = None, generator: Optional[torch.Generator] = None,
                **cond: Any) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, t, generator, **cond))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            t: TimestepLike = None,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            generator: Optional[torch.Generator] = None,
            **cond: Any,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates`` with a timestep: block outputs at ``indices`` (timm's rules).

        There are no prefix tokens and no final norm, so ``return_prefix_tokens`` and ``norm`` change nothing; they
        are accepted for timm compatibility.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, t = self._prepare(x, t, generator)
        stop = max_index + 1 if (stop_early or intermediates_only) else None
        last, inter = self._run(x, t, take=take, stop=stop, **cond)
        if output_fmt == 'NCHW':
            inter = _tokens_to_maps(inter, self.grid_size(x))
        return inter if intermediates_only else (last, inter)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    # -- timm model API ----------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return set()  # the position embedding is a fixed buffer

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^pos_embed|patch_embed|t_embedder', blocks=[(r'^blocks\.(\d+)', None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        w = self.patch_embed.proj.weight  # the new head lives where the model does, in its dtype
        self.head = (nn.Linear(self.embed_dim, num_classes, device=w.device, dtype=w.dtype) if num_classes > 0
                     else nn.Identity())

    # -- merge -------------------------------------------------------------------------------------
    def vit_args(self) -> Dict[str, Any]:
        """Keyword arguments of the timm ``VisionTransformer`` that ``merge`` builds (JSON-serialisable)."""
        return dict(
            img_size=list(self.patch_embed.img_size), in_chans=self.in_chans, num_classes=self.num_classes,
            global_pool=self.global_pool or 'avg', class_token=False, qkv_bias=True, final_norm=False, fc_norm=False,
            act_layer='gelu_tanh', dynamic_img_size=self.dynamic_img_size, **self._arch_args,
            **{k: v for k, v in self._drop_args.items() if v})

    def _merged_vit(self, t: float, device: Union[str, torch.device] = 'cpu') -> MergedViT:
        """An uninitialised ``MergedViT`` (built on the meta device, then given memory: no timm init to redo)."""
        eps = {blk.norm1.eps for blk in self.blocks} | {blk.norm2.eps for blk in self.blocks}
        if eps != {LN_EPS}:
            raise ValueError(f'merge needs LayerNorm eps {LN_EPS} in every block (timm ViT), got {sorted(eps)}')
        with torch.device('meta'):
            vit = MergedViT(self.vit_args(), t, self.schedule, noise_is_schedule_only=self.noise_is_schedule_only,
                            input_hint=self._channel_hint())
        vit = vit.to_empty(device=device)
        vit.pretrained_cfg = vit.default_cfg = dict(getattr(self, 'pretrained_cfg', None) or {})
        return vit

    @torch.no_grad()
    def merged_state_dict(self, t: TimestepLike = None) -> Dict[str, torch.Tensor]:
        """The state dict of the merged ViT at timestep ``t``: the modulation computed and folded in float64.

        Only the conditioning path (timestep MLP, modulation MLPs) and the folded weights pass through float64, so the
        fold is exact to float32 rounding without a float64 copy of the whole model.
        """
        dtype = self.pos_embed.dtype
        t64 = self.schedule.timesteps(self.t if t is None else t, 1, 'cpu').double()
        c = self._condition64(t64)  # (1, W)
        f64 = lambda p: p.detach().to('cpu', torch.float64)  # noqa: E731
        sd: Dict[str, torch.Tensor] = {'pos_embed': self.pos_embed, 'patch_embed.proj.weight': self.patch_embed.proj.weight,
                                       'patch_embed.proj.bias': self.patch_embed.proj.bias}
        for i, blk in enumerate(self.blocks):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation64(blk.adaLN_modulation, c)
            p = f'blocks.{i}.'
            sd[p + 'norm1.weight'], sd[p + 'norm1.bias'] = 1 + scale_msa, shift_msa
            sd[p + 'norm2.weight'], sd[p + 'norm2.bias'] = 1 + scale_mlp, shift_mlp
            sd[p + 'attn.qkv.weight'], sd[p + 'attn.qkv.bias'] = blk.attn.qkv.weight, blk.attn.qkv.bias
            sd[p + 'attn.proj.weight'] = gate_msa[:, None] * f64(blk.attn.proj.weight)
            sd[p + 'attn.proj.bias'] = gate_msa * f64(blk.attn.proj.bias)
            sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'] = blk.mlp.fc1.weight, blk.mlp.fc1.bias
            sd[p + 'mlp.fc2.weight'] = gate_mlp[:, None] * f64(blk.mlp.fc2.weight)
            sd[p + 'mlp.fc2.bias'] = gate_mlp * f64(blk.mlp.fc2.bias)
        if isinstance(self.head, nn.Linear):
            sd['head.weight'], sd['head.bias'] = self.head.weight, self.head.bias
        return {k: v.detach().to('cpu', dtype).clone() for k, v in sd.items()}

    def _condition64(self, t64: torch.Tensor) -> torch.Tensor:
        """``condition`` in float64 on the host (subclasses add their other inputs)."""
        from ..layers.embed import timestep_frequency_embedding
        mlp = self.t_embedder.mlp
        freq = timestep_frequency_embedding(t64, self.t_embedder.frequency_embedding_size).double()
        return _sequential64(mlp, freq)

    @torch.no_grad()
    def merge(self, t: TimestepLike = None) -> MergedViT:
        """Fold the conditioning at timestep ``t`` (default: the fixed t) into a ``MergedViT`` (a timm ViT).

        The result computes the same features as ``self(x, t)`` up to float rounding, with no conditioning overhead,
        and supports everything timm offers for a ViT.
        """
        t_val = float(self.schedule.timesteps(self.t if t is None else t, 1, 'cpu')[0])
        vit = self._merged_vit(t_val, self.pos_embed.device)
        vit.load_state_dict(self.merged_state_dict(t_val), strict=True)
        vit.train(self.training)
        return vit

    def merged_skeleton(self) -> MergedViT:
        """The merged ViT of a freshly initialised encoder at its t, built without any fold (see ``MergedViT``), on the
        current default device (this encoder may live on the meta device)."""
        return self._merged_vit(self.t, torch.empty(()).device).init_like_adaln_zero()


def _sequential64(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a Sequential of Linear and activation layers in float64 on the host."""
    for m in seq:
        if isinstance(m, nn.Linear):
            x = nn.functional.linear(x, m.weight.detach().to('cpu', torch.float64),
                                     None if m.bias is None else m.bias.detach().to('cpu', torch.float64))
        else:
            x = m(x)
    return x


def _modulation64(mod: nn.Sequential, c: torch.Tensor) -> List[torch.Tensor]:
    """A block's six modulation vectors (W,) for a float64 (1, W) conditioning vector."""
    return [m.reshape(-1) for m in _sequential64(mod, c).chunk(6, dim=-1)]
