"""Linear probes on frozen features, and DDAE's grid probe over (layer, t) with a heat map.

The head is MAE's: ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (weights N(0, 0.01), bias 0). The
fast mode used here trains it on features extracted once (no augmentation), with DDAE's optimiser by
default (Adam, lr 1e-3, cosine decay, no weight decay, batch 128).
"""
import json
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import extract_features

__all__ = ['LinearProbeHead', 'fit_linear_probe', 'grid_features', 'grid_probe', 'plot_grid']

GridKey = Tuple[int, float]


class LinearProbeHead(nn.Module):
    """MAE's linear-probe head: parameter-free BatchNorm, then a linear classifier."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, affine=False, eps=1e-6)
        self.fc = nn.Linear(num_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


@torch.no_grad()
def _accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    head.eval()
    correct = sum((head(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / max(1, len(x))


def fit_linear_probe(
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        num_classes: Optional[int] = None,
        epochs: int = 15,
        lr: float = 1e-3,
        batch_size: int = 128,
        weight_decay: float = 0.0,
        seed: int = 0,
) -> Dict[str, Any]:
    """Train a linear head on fixed features; returns top-1 (in %) on train and test, and the head.

    Adam with a half-cycle cosine decay per step (DDAE's probe); the order of the batches is seeded.
    """
    if train_x.dim() != 2 or len(train_x) != len(train_y):
        raise ValueError(f'train_x must be (N, C) with one label each, got {tuple(train_x.shape)} and {len(train_y)} labels')
    num_classes = num_classes or int(max(train_y.max(), test_y.max()).item()) + 1
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearProbeHead(train_x.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(train_x), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return dict(train_top1=100 * _accuracy(head, train_x, train_y), top1=100 * _accuracy(head, test_x, test_y),
                head=head)


@torch.no_grad()
def grid_features(
        model: nn.Module,
        images: torch.Tensor,
        layers: Sequence[int],
        ts: Sequence[Union[int, float]],
        noise: bool = False,
        batch_size: int = 256,
        seed: int = 0,
) -> Dict[GridKey, torch.Tensor]:
    """``extract_features`` over a dataset in batches (one pass per t per batch); seeded noise."""
    g = torch.Generator().manual_seed(seed)
    parts: Dict[GridKey, List[torch.Tensor]] = {}
    for i in range(0, len(images), batch_size):
        feats = extract_features(model, images[i:i + batch_size], layers=layers, ts=ts, noise=noise, generator=g)
        for k, v in feats.items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def grid_probe(
        model: nn.Module,
        train: Tuple[torch.Tensor, torch.Tensor],
        test: Tuple[torch.Tensor, torch.Tensor],
        layers: Sequence[int],
        ts: Sequence[Union[int, float]],
        noise: bool = False,
        batch_size: int = 256,
        seed: int = 0,
        **probe_kwargs: Any,
) -> Dict[GridKey, float]:
    """Top-1 (%) of a linear probe for every (layer, t): the analysis of DDAE's Fig. 3.

    Args:
        model: Anything ``extract_features`` takes (conditional encoder, DAE, DiT encoder, DDAE UNet).
        train, test: (images, labels) tensors, images normalised for the model.
        layers: 0-based block indices (for a DDAE UNet, out_k is k - 1).
        ts: Timesteps.
        noise: Noise the inputs at each t (DDAE's protocol for UNets).
    """
    train_f = grid_features(model, train[0], layers, ts, noise, batch_size, seed)
    test_f = grid_features(model, test[0], layers, ts, noise, batch_size, seed + 1)
    num_classes = int(max(train[1].max(), test[1].max()).item()) + 1
    return {k: fit_linear_probe(train_f[k], train[1], test_f[k], test[1], num_classes=num_classes, seed=seed,
                                **probe_kwargs)['top1'] for k in train_f}


def grid_to_json(results: Dict[GridKey, float]) -> str:
    return json.dumps([dict(layer=k[0], t=k[1], top1=v) for k, v in sorted(results.items())], indent=2)


def plot_grid(results: Dict[GridKey, float], path: str, title: str = 'linear probe top-1 (%)',
              layer_label: str = 'layer') -> str:
    """Write a heat map of a grid probe (layers x timesteps) to ``path`` (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('plot_grid needs matplotlib: pip install "ldae-models[demo]"') from e
    layers = sorted({k[0] for k in results})
    ts = sorted({k[1] for k in results})
    grid = torch.full((len(layers), len(ts)), float('nan'))
    for (layer, t), v in results.items():
        grid[layers.index(layer), ts.index(t)] = v
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ts), 1.0 + 0.45 * len(layers)))
    im = ax.imshow(grid.numpy(), cmap='viridis', aspect='auto')
    ax.set_xticks(range(len(ts)), [f'{t:g}' for t in ts])
    ax.set_yticks(range(len(layers)), [str(v) for v in layers])
    ax.set_xlabel('t')
    ax.set_ylabel(layer_label)
    lo, hi = float(grid.nan_to_num(float('inf')).min()), float(grid.nan_to_num(float('-inf')).max())
    for i in range(len(layers)):
        for j in range(len(ts)):
            v = float(grid[i, j])
            if not math.isnan(v):
                bright = hi > lo and (v - lo) / (hi - lo) > 0.6  # viridis is light at the top: dark text there
                ax.text(j, i, f'{v:.1f}', ha='center', va='center', color='k' if bright else 'w', fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
