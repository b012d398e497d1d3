"""adaLN-Zero transformer blocks (DiT) with an optional low-rank modulation network (l-DAE).

A block is DiT's: a pre-norm ViT block whose LayerNorms carry no affine parameters and are instead
modulated by ``shift`` and ``scale`` vectors computed from a conditioning vector ``c``, and whose two
residual branches are multiplied by ``gate`` vectors. Attention and MLP are timm's own modules, so the
parameter names inside a block are those of a timm ``Block`` (``attn.qkv``, ``attn.proj``, ``mlp.fc1``,
``mlp.fc2``), which is what makes the merge into a plain timm ViT a pure re-weighting.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import Attention, DropPath, Mlp
from timm.layers.activations import GELUTanh

__all__ = ['modulate', 'adaln_modulation', 'AdaLNBlock', 'FinalLayer', 'LN_EPS', 'init_adaln_weights', 'init_dit_weights']

LN_EPS = 1e-6  # every LayerNorm of DiT and l-DAE


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with (B, C) or (B, 1, C) modulation broadcast over tokens (one fused kernel)."""
    if shift.dim() == 2:
        shift, scale = shift[:, None], scale[:, None]
    return torch.addcmul(shift, x, 1 + scale)


def adaln_modulation(dim: int, cond_dim: int, chunks: int, hidden_ratio: Optional[float]) -> nn.Sequential:
    """The per-block modulation network.

    ``hidden_ratio=None`` gives DiT's ``SiLU -> Linear(cond_dim, chunks * dim)``; a ratio r gives the
    l-DAE two-layer MLP ``SiLU -> Linear(cond_dim, r * dim) -> SiLU -> Linear(r * dim, chunks * dim)``
    (the paper's App. A: hidden size 1/4 of the original). The last Linear is index ``-1`` either way.
    """
    if hidden_ratio is None:
        return nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, chunks * dim))
    hidden = max(1, int(round(dim * hidden_ratio)))
    return nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, chunks * dim))


class AdaLNBlock(nn.Module):
    """DiT block: ``x += gate * branch(modulate(LN(x), shift, scale))`` for attention, then MLP."""

    def __init__(
            self,
            dim: int,                                   # token width W
            num_heads: int,                             # attention heads, W divisible by it
            mlp_ratio: float = 4.0,                     # MLP hidden = mlp_ratio * W
            cond_dim: Optional[int] = None,             # width of c (default W)
            adaln_hidden_ratio: Optional[float] = None,  # None: DiT's one Linear; 0.25: l-DAE's MLP
            mlp_norm_eps: float = LN_EPS,               # eps of norm2 (diffusers' DiT uses 1e-5 here)
            drop_path: float = 0.0,                     # stochastic depth of both branches (timm's Block's)
            attn_drop: float = 0.0,                     # dropout of the attention weights
            proj_drop: float = 0.0,                     # dropout after the attention and MLP projections
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=GELUTanh, drop=proj_drop)
        self.adaLN_modulation = adaln_modulation(dim, cond_dim or dim, 6, adaln_hidden_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def modulation(self, c: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, 1, W)."""
        return self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = self._residual(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return self._residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))  # (B, N, W)

    def _residual(self, x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``x + gate * branch``: one fused kernel, or with stochastic depth on the gated branch."""
        if isinstance(self.drop_path, nn.Identity):
            return torch.addcmul(x, gate, branch)
        return x + self.drop_path(gate * branch)


class FinalLayer(nn.Module):
    """DiT's final layer: non-affine LayerNorm, adaLN (shift, scale), Linear to per-patch outputs."""

    def __init__(self, dim: int, out_features: int, cond_dim: Optional[int] = None) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(dim, out_features, bias=True)
        self.adaLN_modulation = adaln_modulation(dim, cond_dim or dim, 2, None)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, out_features)


def init_adaln_weights(module: nn.Module) -> None:
    """DiT's initialisation: xavier-uniform Linears with zero bias, then zero the adaLN outputs.

    Applied to a module tree; the zeroing makes every block start as the identity (adaLN-Zero).
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, (AdaLNBlock, FinalLayer)):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)


def init_dit_weights(module: nn.Module, patch_proj: nn.Conv2d, t_embedder: nn.Module,
                     label_table: Optional[nn.Embedding] = None) -> None:
    """DiT's initialisation of a whole model: ``init_adaln_weights``, then a xavier patch embedding with zero bias,
    and N(0, 0.02) for the timestep MLP and the label table."""
    init_adaln_weights(module)
    w = patch_proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(patch_proj.bias)
    nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)
    if label_table is not None:
        nn.init.normal_(label_table.weight, std=0.02)
