"""Every figure of the zoo, and the one place matplotlib is imported (the ``demo`` extra): the denoising figure
(the paper's Fig. 8), the (layer, t) grid of a probe (DDAE's Fig. 3), RepFusion's histogram of the chosen t, and a
bar chart of runs against their floors."""
import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch

from .features import GridKey

__all__ = ['pyplot', 'denoising_figure', 'plot_grid', 't_histogram_figure', 'bar_chart']


def pyplot(required: bool = True):
    """matplotlib's pyplot on the Agg backend; None where matplotlib is absent and ``required`` is False."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        if not required:
            return None
        raise ImportError('figures need matplotlib: pip install "ldae-models[demo]"') from e
    return plt


def denoising_figure(images: torch.Tensor, noisy: torch.Tensor, pred: torch.Tensor, t: float, path: str) -> List[Dict]:
    """The paper's Fig. 8 with titles: per row clean / noised at t / denoised, each with its MSE to the clean image."""
    plt = pyplot()
    rows = []
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.6 * len(images)), squeeze=False)
    for i in range(len(images)):
        mse_noisy = (noisy[i] - images[i]).square().mean().item()
        mse_pred = (pred[i] - images[i]).square().mean().item()
        rows.append(dict(mse_noisy=mse_noisy, mse_denoised=mse_pred))
        for j, (img, title) in enumerate(((images[i], 'clean'), (noisy[i], f'noised at t={t:g}\nMSE {mse_noisy:.4f}'),
                                          (pred[i], f'denoised\nMSE {mse_pred:.4f}'))):
            ax = axes[i, j]
            ax.imshow(((img.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy(), interpolation='nearest')
            ax.set_title(title, fontsize=9)
            ax.axis('off')
    fig.suptitle('l-DAE denoising (MSE against the clean image, images in [-1, 1])', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows


def plot_grid(results: Dict[GridKey, float], path: str, title: str = 'linear probe top-1 (%)',
              layer_label: str = 'block') -> str:
    """Write a heat map of a grid probe (layers x timesteps, values top-1 %) to ``path`` (needs matplotlib)."""
    plt = pyplot()
    layers = sorted({k[0] for k in results})
    ts = sorted({k[1] for k in results}, key=lambda v: -1 if v is None else v)
    grid = torch.full((len(layers), len(ts)), float('nan'))
    for (layer, t), v in results.items():
        grid[layers.index(layer), ts.index(t)] = v
    width = max(4.5, 1.8 + 0.9 * len(ts))  # room for the title, wrapped to the figure's width
    title = '\n'.join(textwrap.wrap(title, width=max(20, int(width * 9))))
    fig, ax = plt.subplots(figsize=(width, 1.4 + 0.45 * len(layers) + 0.2 * title.count('\n')))
    im = ax.imshow(grid.numpy(), cmap='viridis', aspect='auto')
    ax.set_xticks(range(len(ts)), ['-' if t is None else f'{t:g}' for t in ts])
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
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def t_histogram_figure(rows: List[Dict[str, Any]], path: Union[str, Path], policy: str) -> None:
    """RepFusion's share of the chosen t in each tenth of the distillation (rows of ``t_hist`` counts, in order);
    nothing without matplotlib."""
    plt = pyplot(required=False)
    if plt is None or not rows:
        return
    counts = torch.tensor([r['t_hist'] for r in rows], dtype=torch.float32)
    frac = counts / counts.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    im = ax.imshow(frac.T.numpy(), aspect='auto', origin='lower', cmap='viridis',
                   extent=(0, 1, 0, 1))  # each column: a tenth of the stage
    ax.set_xlabel('fraction of the distillation')
    ax.set_ylabel('t / T (tenths)')
    ax.set_title(f'RepFusion: share of the chosen t ({policy} policy)')
    fig.colorbar(im, ax=ax, label='share of the images')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bar_chart(rows: Sequence[Tuple[str, float]], floors: Sequence[Tuple[str, float]], path: Union[str, Path],
              title: str, xlabel: str = 'linear probe top-1 (%)') -> None:
    """Horizontal bars of runs (blue) and their floors (gray); nothing without matplotlib."""
    plt = pyplot(required=False)
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 0.4 * (len(rows) + len(floors)) + 1))
    names, vals = zip(*(list(rows) + list(floors)))
    ax.barh(names, vals, color=['tab:blue'] * len(rows) + ['tab:gray'] * len(floors))
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
