"""Fixed embeddings shared by the DiT-style models: 2-D sin-cos positions and the timestep embedder.

Both follow the official DiT code (facebookresearch/DiT, ``models.py``) formula for formula, so that
checkpoints trained with it load and compute the same thing here.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['sincos_pos_embed_2d', 'timestep_frequency_embedding', 'sinusoidal_embedding', 'TimestepEmbedder',
           'LabelEmbedder']


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE's 1-D embedding: ``[sin(pos * omega), cos(pos * omega)]``, sin first, in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (dim/2,)
    out = pos.reshape(-1, 1).to(torch.float64) * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_pos_embed_2d(embed_dim: int, grid_size: Tuple[int, int]) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding of MAE and DiT.

    The first half of the channels encodes the column (w) index and the second half the row (h) index,
    which is what ``np.meshgrid(grid_w, grid_h)`` followed by ``grid[0]`` gives in the reference code.

    Args:
        embed_dim: Channels, divisible by 4.
        grid_size: (rows, columns) of the patch grid.

    Returns:
        Tensor (rows * columns, embed_dim), float32, tokens in row-major order.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f'sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}')
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')
    emb_w = _sincos_1d(embed_dim // 2, cols)  # first half: column index
    emb_h = _sincos_1d(embed_dim // 2, rows)  # second half: row index
    return torch.cat([emb_w, emb_h], dim=1).float()


def timestep_frequency_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """DiT's sinusoidal timestep embedding: ``[cos(t * f), sin(t * f)]`` (cos first).

    ``f_i = exp(-ln(max_period) * i / half)`` for ``i < half = dim // 2``. ``t`` is the timestep index
    (0..999 in DiT and l-DAE), not a fraction.

    Args:
        t: (N,) timesteps, may be fractional.
        dim: Embedding size.
        max_period: Controls the lowest frequency.

    Returns:
        Tensor (N, dim) in float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sinusoidal_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                         max_period: float = 10000.0) -> torch.Tensor:
    """Ho et al.'s (DDPM UNet) time embedding, sin first (``flip_sin_to_cos``: cos first, diffusers' flag): ``[sin(t f), cos(t f)]``, ``f_i = exp(-ln(P) i / (half - freq_shift))``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: frequency embedding, then Linear, SiLU, Linear (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_frequency_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, hidden)


class LabelEmbedder(nn.Module):
    """DiT's class-label embedding; row ``num_classes`` is the null label used for classifier-free guidance.

    With ``dropout_prob > 0`` the table has ``num_classes + 1`` rows and, in training, labels are replaced by
    the null label with that probability (DiT's label dropout).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor, train: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)
