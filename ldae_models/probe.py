"""Linear probes on frozen features, and DDAE's grid probe over (layer, t) with a heat map.

The head is MAE's: ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (weights N(0, 0.01), bias 0). The
fast mode used here trains it on features extracted once (no augmentation), with DDAE's optimiser by
default (Adam, lr 1e-3, cosine decay, no weight decay, batch 128).
"""
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

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


# -- the `ldae-models probe` command ------------------------------------------------------------------------

def _folder(root: str, split_names: Sequence[str]) -> str:
    from pathlib import Path
    for name in split_names:
        if (Path(root) / name).is_dir():
            return str(Path(root) / name)
    raise SystemExit(f'no {" or ".join(split_names)} folder under {root}')


def _load_split(root: str, transform: Any, limit: int) -> Tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(root, transform=transform)
    idx = list(range(len(ds)))
    if limit and limit < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:limit].tolist()
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(xs), torch.tensor(ys)


def _create(args: Any, merged: bool):
    import json as _json
    import timm
    import ldae_models  # noqa: F401
    kw = _json.loads(args.model_args) if args.model_args else {}
    if args.checkpoint:
        kw['pretrained_cfg_overlay'] = dict(file=args.checkpoint)
    pretrained = bool(args.checkpoint) or '.' in args.model or args.model.startswith(('hf-hub:', 'local-dir:'))
    if args.model.split('.')[0].startswith('ddae_'):
        return timm.create_model(args.model, pretrained=pretrained, t=args.t, noise=args.noise, **kw).eval()
    return timm.create_model(args.model, pretrained=pretrained, merged=merged, t=args.t, **kw).eval()


def _mae_protocol(model: nn.Module, args: Any, train_root: str, test_root: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """MAE's linear probe: frozen encoder, augmented batches every epoch, LARS (or SGD), warmup + cosine."""
    import timm.data
    from timm.optim import Lars
    from torchvision.datasets import ImageFolder
    size = cfg['input_size'][-1]
    train_tf = timm.data.create_transform(size, is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=None,
                                          auto_augment=None, re_prob=0.0, interpolation='bicubic', mean=cfg['mean'],
                                          std=cfg['std'])
    eval_tf = timm.data.create_transform(**cfg, is_training=False)
    train_ds, test_ds = ImageFolder(train_root, train_tf), ImageFolder(test_root, eval_tf)
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=g,
                                         num_workers=args.workers, drop_last=len(train_ds) > args.batch_size)
    head = LinearProbeHead(model.num_features, len(train_ds.classes))
    lr = args.blr * args.batch_size / 256
    opt = Lars(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0) if args.optimizer == 'lars' else \
        torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps, warm = args.epochs * len(loader), args.warmup_epochs * len(loader)
    step = 0
    for _ in range(args.epochs):
        head.train()
        for x, y in loader:
            for group in opt.param_groups:
                group['lr'] = lr * (step + 1) / warm if step < warm else \
                    lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
            with torch.no_grad():
                f = model(x)
            loss = F.cross_entropy(head(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test_ds, batch_size=256, num_workers=args.workers):
            correct += (head(model(x)).argmax(1) == y).sum().item()
            total += len(y)
    return dict(top1=100 * correct / max(1, total), n_train=len(train_ds), n_test=total)


def probe_main(argv: Optional[List[str]] = None) -> int:
    """``ldae-models probe``: linear-probe accuracy of an encoder on an ImageFolder (train/ and test/ or val/)."""
    import argparse
    import timm.data
    ap = argparse.ArgumentParser(prog='ldae-models probe', description=probe_main.__doc__)
    ap.add_argument('--model', required=True, help='NAME[.TAG], local-dir:PATH or hf-hub:ORG/NAME')
    ap.add_argument('--checkpoint', help='weights file to load into the model')
    ap.add_argument('--model-args', help='JSON object of model keyword arguments')
    ap.add_argument('--data-dir', required=True, help='ImageFolder root with train/ and test/ (or val/)')
    ap.add_argument('--mode', choices=('fast', 'mae', 'grid'), default='fast',
                    help='fast: features once, no augmentation (default); mae: MAE protocol; grid: (layer, t) grid')
    ap.add_argument('--t', type=float, default=10, help='fixed timestep (fast, mae) (default: %(default)s)')
    ap.add_argument('--layers', type=int, nargs='+', help='grid: 0-based block indices (default: all)')
    ap.add_argument('--ts', type=float, nargs='+', default=[0, 10, 20, 40, 80], help='grid: timesteps')
    ap.add_argument('--noise', action='store_true', help='noise the input at t (DDAE protocol, paper: "noisy input")')
    ap.add_argument('--epochs', type=int, default=15, help='probe epochs (MAE: 90 for ViT-B)')
    ap.add_argument('--warmup-epochs', type=int, default=1)
    ap.add_argument('--batch-size', type=int, default=128)
    ap.add_argument('--lr', type=float, default=1e-3, help='fast/grid: Adam lr (DDAE)')
    ap.add_argument('--blr', type=float, default=0.1, help='mae: base lr, lr = blr * batch / 256 (MAE)')
    ap.add_argument('--optimizer', choices=('lars', 'sgd'), default='lars', help='mae: optimiser')
    ap.add_argument('--max-train', type=int, default=0, help='use at most this many training images (0: all)')
    ap.add_argument('--max-test', type=int, default=0)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', help='write the result as JSON here')
    ap.add_argument('--plot', help='grid: write the heat map here (PNG)')
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    train_root = _folder(args.data_dir, ('train',))
    test_root = _folder(args.data_dir, ('test', 'val'))
    model = _create(args, merged=args.mode == 'mae' and not args.noise)
    cfg = timm.data.resolve_model_data_config(model)
    result: Dict[str, Any] = dict(model=args.model, checkpoint=args.checkpoint, mode=args.mode, noise=args.noise)
    if args.mode == 'mae':
        result.update(t=args.t, epochs=args.epochs, optimizer=args.optimizer, **_mae_protocol(model, args, train_root,
                                                                                              test_root, cfg))
    else:
        tf = timm.data.create_transform(**cfg, is_training=False)
        train = _load_split(train_root, tf, args.max_train)
        test = _load_split(test_root, tf, args.max_test)
        n_blocks = len(model.blocks)
        if args.mode == 'fast':
            layers, ts = [n_blocks - 1], [args.t]
        else:
            layers, ts = args.layers if args.layers else list(range(n_blocks)), args.ts
        grid = grid_probe(model, train, test, layers=layers, ts=ts, noise=args.noise, seed=args.seed,
                          epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
        result.update(n_train=len(train[1]), n_test=len(test[1]), epochs=args.epochs,
                      grid=[dict(layer=k[0], t=k[1], top1=v) for k, v in sorted(grid.items())])
        best = max(grid.items(), key=lambda kv: kv[1])
        result.update(top1=best[1], best_layer=best[0][0], best_t=best[0][1])
        if args.mode == 'grid' and args.plot:
            plot_grid(grid, args.plot, title=f'{args.model}: linear probe top-1 (%)')
    print(f"{args.model} ({args.mode}): top-1 {result['top1']:.2f}%" +
          (f" at layer {result['best_layer']}, t {result['best_t']:g}" if 'best_layer' in result else ''))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=2)
    return 0
