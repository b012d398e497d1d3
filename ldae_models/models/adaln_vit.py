"""Conditional adaLN ViT encoders and their merge into a plain timm ``VisionTransformer``.

``AdaLNViT`` is the encoder half of a DiT-style denoiser: patch embedding, fixed 2-D sin-cos positions
(no class token), a stack of adaLN-Zero blocks conditioned on a timestep embedding, global average pool
and an optional linear head. It is the base of the l-DAE encoders (``ldae_vit.py``).

With the timestep fixed, the conditioning vector ``c`` is a constant, so every block's modulation is a
constant and folds into ordinary weights (l-DAE, App. A, and the spec's item 7)::

    LN(x) * (1 + scale) + shift  ==  LayerNorm(weight=1 + scale, bias=shift)(x)
    gate * (W h + b)             ==  Linear(weight=gate[:, None] * W, bias=gate * b)(h)

``AdaLNViT.merge(t)`` performs this fold in float64 and returns a genuine timm ``VisionTransformer``
(no class token, average pool, GELU-tanh, LayerNorm eps 1e-6, no final norm) with the same outputs.
"""
import copy
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models import VisionTransformer, build_model_with_cfg
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch.utils.checkpoint import checkpoint

from ..layers.blocks import AdaLNBlock, init_adaln_weights
from ..layers.embed import TimestepEmbedder, sincos_pos_embed_2d
from ..pretrained import _NOT_MODEL_ARGS, load_pretrained

__all__ = ['AdaLNViT', 'TimestepT', 'create_adaln_encoder']

TimestepT = Union[int, float, torch.Tensor, None]


class AdaLNViT(nn.Module):
    """Timestep-conditioned ViT encoder made of DiT blocks.

    ``model(x, t=None)`` returns pooled features (or logits when ``num_classes > 0``); ``t`` defaults to the
    fixed ``t`` given at construction. Timesteps are indices in ``[0, num_timesteps)``, as in DiT.
    """

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
            t: float = 10,                                 # fixed timestep used when forward gets none
            num_timesteps: int = 1000,                     # valid timesteps are [0, num_timesteps)
            dynamic_img_size: bool = False,                # accept other sizes, resampling positions
            drop_rate: float = 0.0,                        # dropout before the head
            mlp_norm_eps: float = 1e-6,                    # eps of each block's norm2
    ) -> None:
        super().__init__()
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.num_timesteps = num_timesteps
        self.dynamic_img_size = dynamic_img_size
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self._arch_args: Dict[str, Any] = dict(
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)

        embed_args = dict(strict_img_size=False, output_fmt='NHWC') if dynamic_img_size else {}
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, **embed_args)
        grid = self.patch_embed.grid_size
        # Fixed sin-cos positions: a buffer kept in the state dict (DiT stores it too).
        self.register_buffer('pos_embed', sincos_pos_embed_2d(embed_dim, grid)[None])  # (1, N, W)
        self.t_embedder = TimestepEmbedder(embed_dim)
        self.blocks = nn.ModuleList([
            AdaLNBlock(embed_dim, num_heads, mlp_ratio, adaln_hidden_ratio=adaln_hidden_ratio, mlp_norm_eps=mlp_norm_eps)
            for _ in range(depth)])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = patch_size
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.t = self._check_t(torch.as_tensor(t, device='cpu')).item()
        self.init_weights()

    # -- initialisation ----------------------------------------------------------------------------
    def init_weights(self) -> None:
        """DiT's scheme: xavier Linears, xavier patch embed, N(0, 0.02) timestep MLP, zero adaLN outputs."""
        init_adaln_weights(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # -- conditioning ------------------------------------------------------------------------------
    def _check_t(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f'timestep t must be finite, got {t.tolist()}')
        bad = (t < 0) | (t >= self.num_timesteps)
        if bad.any():
            raise ValueError(f'timestep t must be in [0, {self.num_timesteps}) (a step index, not a fraction '
                             f'of 1), got {t[bad].flatten()[:4].tolist()}')
        return t

    def timesteps(self, t: TimestepT, batch_size: int, device: torch.device) -> torch.Tensor:
        """Normalise ``t`` (None, a number, a 0-d, (1,) or (B,) tensor) to a checked (1,) or (B,) tensor."""
        t = torch.as_tensor(self.t if t is None else t, device=device)
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1 or t.shape[0] not in (1, batch_size):
            raise ValueError(f'timestep t must be a number or a tensor of shape (1,) or ({batch_size},), '
                             f'got shape {tuple(t.shape)}')
        return self._check_t(t)

    def condition(self, t: TimestepT, batch_size: int, device: torch.device, **cond: Any) -> torch.Tensor:
        """The conditioning vector ``c`` (1 or B, W) for timestep(s) ``t`` (subclasses add other inputs)."""
        if cond:
            raise TypeError(f'{type(self).__name__} takes no conditioning besides t, got {sorted(cond)}')
        return self.t_embedder(self.timesteps(t, batch_size, device))

    # -- input -------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem when ``x`` is not a batch of images this model accepts."""
        if x.dim() != 4:
            raise ValueError(f'expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'expected {self.in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})')
        H, W = x.shape[-2:]
        p = self.patch_embed.patch_size
        if self.dynamic_img_size:
            if H % p[0] or W % p[1]:
                raise ValueError(f'image size {H}x{W} is not divisible by the patch size {p[0]}x{p[1]}')
        elif (H, W) != tuple(self.patch_embed.img_size):
            h0, w0 = self.patch_embed.img_size
            raise ValueError(f'expected {h0}x{w0} images, got {H}x{W}; build the model with '
                             f'dynamic_img_size=True (or img_size=...) for other sizes')

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:  # same resampling as timm's ViT, so merged and conditional agree
            B, H, W, C = x.shape
            pos = resample_abs_pos_embed(self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                                         num_prefix_tokens=0)
            return x.view(B, -1, C) + pos
        return x + self.pos_embed

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, N, W) with positions."""
        self.check_input(x)
        return self._pos_embed(self.patch_embed(x))

    def _run_block(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint(blk, x, c, use_reentrant=False)
        return blk(x, c)

    # -- forward -----------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, t: TimestepT = None, **cond: Any) -> torch.Tensor:
        """Images -> output tokens (B, N, W) of the last block (no final norm, as in l-DAE)."""
        x = self.embed(x)
        c = self.condition(t, x.shape[0], x.device, **cond)
        for blk in self.blocks:
            x = self._run_block(blk, x, c)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1) if self.global_pool == 'avg' else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, t: TimestepT = None, **cond: Any) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, t, **cond))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            t: TimestepT = None,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            **cond: Any,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ``forward_intermediates`` with a timestep: block outputs at ``indices`` (timm's rules).

        There are no prefix tokens and no final norm, so ``return_prefix_tokens`` and ``norm`` change
        nothing; they are accepted for timm compatibility.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self.embed(x)
        c = self.condition(t, B, x.device, **cond)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, c)
            if i in take_indices:
                intermediates.append(x)
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
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
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # -- merge -------------------------------------------------------------------------------------
    def vit_args(self) -> Dict[str, Any]:
        """Keyword arguments of the timm ``VisionTransformer`` that ``merge`` builds (JSON-serialisable)."""
        return dict(
            img_size=list(self.patch_embed.img_size), in_chans=self.in_chans, num_classes=self.num_classes,
            global_pool=self.global_pool or 'avg', class_token=False, qkv_bias=True, final_norm=False, fc_norm=False,
            act_layer='gelu_tanh', dynamic_img_size=self.dynamic_img_size, **self._arch_args)

    @torch.no_grad()
    def merged_state_dict(self, t: TimestepT = None) -> Dict[str, torch.Tensor]:
        """The state dict of the merged ViT at timestep ``t``, folded in float64 and cast back."""
        dtype = self.pos_embed.dtype
        t = self.timesteps(t, 1, torch.device('cpu'))
        ref = copy.deepcopy(self).to('cpu', torch.float64)
        c = ref.condition(t, 1, torch.device('cpu'))  # (1, W)
        sd: Dict[str, torch.Tensor] = {
            'pos_embed': ref.pos_embed,
            'patch_embed.proj.weight': ref.patch_embed.proj.weight,
            'patch_embed.proj.bias': ref.patch_embed.proj.bias,
        }
        for i, blk in enumerate(ref.blocks):
            mods = [m.reshape(-1) for m in blk.modulation(c)]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
            p = f'blocks.{i}.'
            sd[p + 'norm1.weight'], sd[p + 'norm1.bias'] = 1 + scale_msa, shift_msa
            sd[p + 'norm2.weight'], sd[p + 'norm2.bias'] = 1 + scale_mlp, shift_mlp
            sd[p + 'attn.qkv.weight'], sd[p + 'attn.qkv.bias'] = blk.attn.qkv.weight, blk.attn.qkv.bias
            sd[p + 'attn.proj.weight'] = gate_msa[:, None] * blk.attn.proj.weight
            sd[p + 'attn.proj.bias'] = gate_msa * blk.attn.proj.bias
            sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'] = blk.mlp.fc1.weight, blk.mlp.fc1.bias
            sd[p + 'mlp.fc2.weight'] = gate_mlp[:, None] * blk.mlp.fc2.weight
            sd[p + 'mlp.fc2.bias'] = gate_mlp * blk.mlp.fc2.bias
        if isinstance(ref.head, nn.Linear):
            sd['head.weight'], sd['head.bias'] = ref.head.weight, ref.head.bias
        return {k: v.detach().to(dtype).clone() for k, v in sd.items()}

    @torch.no_grad()
    def merge(self, t: TimestepT = None) -> VisionTransformer:
        """Fold the conditioning at timestep ``t`` (default: the fixed t) into a plain timm ViT.

        The result computes the same features as ``self(x, t)`` up to float rounding, with no
        conditioning overhead, and supports everything timm offers for a ViT.
        """
        t_val = self.timesteps(t, 1, torch.device('cpu')).item()
        norm_eps = {blk.norm2.eps for blk in self.blocks} | {blk.norm1.eps for blk in self.blocks}
        if norm_eps != {1e-6}:
            raise ValueError(f'merge needs LayerNorm eps 1e-6 in every block (timm ViT), got {sorted(norm_eps)}')
        args = self.vit_args()
        vit = VisionTransformer(**args)
        vit.load_state_dict(self.merged_state_dict(t_val), strict=True)
        vit.vit_args = args  # how to rebuild it with timm alone (used by export)
        vit.to(self.pos_embed.device)
        vit.train(self.training)
        cfg = dict(getattr(self, 'pretrained_cfg', None) or {})
        vit.pretrained_cfg = vit.default_cfg = cfg
        vit.merged_t = t_val  # the timestep folded into the weights; used by extract_features
        return vit


def create_adaln_encoder(
        cls: type,
        variant: str,
        pretrained: bool,
        filter_fn: Any,
        defaults: Dict[str, Any],
        kwargs: Dict[str, Any],
) -> Tuple[nn.Module, 'AdaLNViT']:
    """What every conditional-encoder entrypoint does: build, load weights, merge, wrap for ``features_only``.

    Weights load through ``ldae_models.pretrained.load_pretrained`` (sha256, safe reading, strict load).
    Keyword arguments beyond the model's own: ``merged`` (default True), ``features_only``, ``out_indices``,
    ``cache_dir``. Returns (the model to hand out, the conditional encoder it was made from).
    """
    call_args = {k: v for k, v in kwargs.items() if k not in _NOT_MODEL_ARGS}
    merged = kwargs.pop('merged', True)
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', 3)
    cache_dir = kwargs.pop('cache_dir', None)
    kwargs.pop('feature_cls', None)  # features come from forward_intermediates (timm's 'getter')
    base = build_model_with_cfg(cls, variant, pretrained=False, **{**defaults, **kwargs})
    size = (base.in_chans, *base.patch_embed.img_size)  # the cfg follows img_size, for timm's data pipeline
    base.pretrained_cfg = base.default_cfg = {**base.pretrained_cfg, 'input_size': size}
    if pretrained:
        load_pretrained(base, base.pretrained_cfg, filter_fn=filter_fn, cache_dir=cache_dir)
    model = base.merge() if merged else base
    if features_only:
        cfg = model.pretrained_cfg
        model = FeatureGetterNet(model, out_indices=out_indices, output_fmt='NCHW')
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(cfg)
    model._model_args = {**getattr(model, '_model_args', {}), **call_args, 'merged': merged}
    return model, base
