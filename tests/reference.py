"""An independent implementation of a conditional DiT/l-DAE encoder, from the formulas alone.

It reads a state dict and computes with plain tensor operations (no module of ldae_models or timm), so
that the package's modules are checked against the papers' formulas, not against themselves.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


def mae_sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed, re-derived in numpy: meshgrid(w, h); first half from grid[0]."""
    gh = np.arange(grid, dtype=np.float64)
    gw = np.arange(grid, dtype=np.float64)
    mesh = np.meshgrid(gw, gh)  # mesh[0] varies along columns
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    emb = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
    return torch.from_numpy(emb).float()


def dit_timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def linear(x, sd, name):
    return x @ sd[name + '.weight'].T + sd[name + '.bias']


def modulation_mlp(c, sd, prefix):
    """SiLU -> Linear (DiT), or SiLU -> Linear -> SiLU -> Linear (l-DAE), read off the keys present."""
    h = linear(F.silu(c), sd, prefix + '.1')
    if prefix + '.3.weight' in sd:
        h = linear(F.silu(h), sd, prefix + '.3')
    return h


def attention(x, sd, prefix, heads):
    B, N, C = x.shape
    qkv = linear(x, sd, prefix + '.qkv').reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // heads), dim=-1)
    return linear((a @ v).transpose(1, 2).reshape(B, N, C), sd, prefix + '.proj')


def reference_blocks(sd, x, c, num_blocks, heads, prefix='blocks', eps=(1e-6, 1e-6)):
    """Runs DiT blocks on tokens x with conditioning c; returns the list of every block's output."""
    outs = []
    for i in range(num_blocks):
        p = f'{prefix}.{i}'
        m = modulation_mlp(c, sd, p + '.adaLN_modulation')[:, None]
        s1, sc1, g1, s2, sc2, g2 = m.chunk(6, dim=-1)
        x = x + g1 * attention(layer_norm(x, eps[0]) * (1 + sc1) + s1, sd, p + '.attn', heads)
        h = layer_norm(x, eps[1]) * (1 + sc2) + s2
        x = x + g2 * linear(gelu_tanh(linear(h, sd, p + '.mlp.fc1')), sd, p + '.mlp.fc2')
        outs.append(x)
    return outs


def reference_encoder(sd, images, t, patch, heads, num_blocks):
    """Tokens after every block of a conditional encoder (state dict keys of AdaLNViT)."""
    x = F.conv2d(images, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = x + mae_sincos_pos_embed(x.shape[-1], images.shape[-1] // patch)[None]
    t = torch.as_tensor(t).reshape(-1).expand(images.shape[0])
    c = linear(F.silu(linear(dit_timestep_embedding(t), sd, 't_embedder.mlp.0')), sd, 't_embedder.mlp.2')
    return reference_blocks(sd, x, c, num_blocks, heads)


def reference_dit(sd, x, t, y, patch, heads, depth, out_channels):
    """The official DiT forward from its state dict: returns (output, [hidden after every block])."""
    B, _, H, W = x.shape
    h = F.conv2d(x, sd['x_embedder.proj.weight'], sd['x_embedder.proj.bias'], stride=patch).flatten(2).transpose(1, 2)
    h = h + mae_sincos_pos_embed(h.shape[-1], H // patch)[None]
    t = torch.as_tensor(t).reshape(-1).expand(B)
    c = linear(F.silu(linear(dit_timestep_embedding(t), sd, 't_embedder.mlp.0')), sd, 't_embedder.mlp.2')
    c = c + sd['y_embedder.embedding_table.weight'][torch.as_tensor(y).reshape(-1).expand(B)]
    hidden = reference_blocks(sd, h, c, depth, heads)
    shift, scale = linear(F.silu(c), sd, 'final_layer.adaLN_modulation.1')[:, None].chunk(2, dim=-1)
    out = linear(layer_norm(hidden[-1], 1e-6) * (1 + scale) + shift, sd, 'final_layer.linear')
    g = H // patch
    out = out.reshape(B, g, g, patch, patch, out_channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(B, out_channels, H, W), hidden
