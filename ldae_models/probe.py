"""Probes of frozen features: the linear probe (features once, the convex problem solved to its optimum), kNN, the
(layer, t) grid, the floors, and the top-1 of a classifier. MAE's augmented protocol is a training job
(``jobs.linprobe``).

The fast linear probe solves one convex problem: multinomial logistic regression on the features (MAE's head,
``BatchNorm1d(affine=False)`` + ``Linear``, is such a model), with an optional L2 penalty (default none, as MAE's
probe). Encoder features are badly conditioned (the covariance of the shipped tiny model's features has a condition
number of 7e6), so the problem is solved in the basis that whitens the training features, where it is the same
problem without a penalty but a well-conditioned one:

- ``solver='lbfgs'`` (default): full-batch L-BFGS with a strong-Wolfe line search: tens of iterations;
- ``solver='adam'``: mini-batch Adam with a cosine schedule (the DDAE probe's optimiser), a few epochs.

``check_against_lbfgs`` compares it with full-batch L-BFGS on the standardised features (the textbook reference):
both should reach the same objective, and the reference needs thousands of iterations to get there.

``knn_accuracy`` is the second readout (k = 20, cosine similarity of features centred by the training mean, votes
weighted by exp(sim / 0.07), as in DINO). ``floors`` gives the two baselines every table reports beside a model: a
randomly initialised network of the same shape, and the raw pixels.
"""
import contextlib
import json
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageData, Split, normalize, read_batches, sequential
from .engine.optim import lr_at  # the one lr schedule of the zoo
from .features import GridKey, dataset_features, feature_key
from .models.extractor import FeatureDict, as_extractor
from .progress import Progress

__all__ = ['LinearProbeHead', 'fit_linear_probe', 'knn_accuracy', 'grid_probe', 'probe_features', 'floors',
           'random_counterpart', 'pixel_features', 'check_against_lbfgs', 'classifier_top1', 'SOLVERS']

SOLVERS = ('lbfgs', 'adam')


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


def whitening(train_x: torch.Tensor, rel_eps: float = 1e-12) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean (C,), P (C, k)) in float64 with ``(x - mean) @ P`` white on the training set, over the k eigen-directions
    of the covariance whose eigenvalue is above ``rel_eps`` of the largest (float64 eigendecomposition)."""
    x = train_x.double()
    mean = x.mean(0)
    cov = torch.cov((x - mean).T).reshape(x.shape[1], x.shape[1])
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals > rel_eps * evals.max().clamp_min(1e-300)
    return mean, evecs[:, keep] / evals[keep].sqrt()


def _accuracy(logits_fn: Any, x: torch.Tensor, y: torch.Tensor, batch: int = 8192) -> float:
    correct = sum((logits_fn(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / max(1, len(x))


def _solve(z: torch.Tensor, y: torch.Tensor, num_classes: int, solver: str, weight_decay: float, epochs: int,
           lr: float, batch_size: int, max_iter: int, tol: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise mean CE(z W^T + b) + weight_decay / 2 ||W||^2; returns (W, b, iterations)."""
    g = torch.Generator(device='cpu').manual_seed(seed)
    W = torch.zeros(num_classes, z.shape[1], device=z.device, dtype=z.dtype, requires_grad=True)
    b = torch.zeros(num_classes, device=z.device, dtype=z.dtype, requires_grad=True)

    def objective(zb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(zb @ W.T + b, yb) + 0.5 * weight_decay * W.square().sum()

    if solver == 'lbfgs':
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, history_size=20,
                                tolerance_grad=tol, tolerance_change=1e-12, line_search_fn='strong_wolfe')
        calls = [0]

        def closure() -> torch.Tensor:
            calls[0] += 1
            opt.zero_grad()
            loss = objective(z, y)
            loss.backward()
            return loss
        opt.step(closure)
        return W.detach(), b.detach(), calls[0]
    opt = torch.optim.Adam([W, b], lr=lr)
    steps = epochs * math.ceil(len(z) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps, 0, 1.0))  # no warmup, cosine to 0
    for _ in range(epochs):
        perm = torch.randperm(len(z), generator=g).to(z.device)
        for i in range(0, len(z), batch_size):
            idx = perm[i:i + batch_size]
            loss = objective(z[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return W.detach(), b.detach(), steps


def fit_linear_probe(
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        num_classes: Optional[int] = None,
        solver: str = 'lbfgs',
        weight_decay: float = 0.0,
        whiten: bool = True,
        epochs: int = 30,
        lr: float = 1e-2,
        batch_size: int = 1024,
        max_iter: int = 1000,
        tol: float = 1e-6,
        device: Union[str, torch.device] = 'cpu',
        seed: int = 0,
) -> Dict[str, Any]:
    """Fit the linear probe on fixed features (N, C); returns top-1 (%) on train and test, the objective value reached
    (mean cross-entropy on the training set, plus the penalty), the iterations, the fit time, and the head as MAE's
    ``LinearProbeHead`` (its BatchNorm holds the standardisation).

    With ``whiten`` (the default) the problem is solved in the basis that makes the training features white, which
    changes nothing about its optimum when ``weight_decay = 0`` (logistic regression is invariant to an invertible
    linear map of its features) but turns a problem whose covariance has a condition number of 1e6 or more (seen on
    encoder features) into one that L-BFGS solves in tens of iterations and Adam in a few epochs.

    Args:
        solver: ``'lbfgs'`` (full batch) or ``'adam'`` (mini-batch: ``epochs`` x ``batch_size``, ``lr`` with a
            half-cycle cosine decay).
        weight_decay: The L2 penalty of the problem (in the whitened basis when ``whiten``).
    """
    if train_x.dim() != 2 or len(train_x) != len(train_y):
        raise ValueError(f'train_x must be (N, C) with one label each, got {tuple(train_x.shape)} and {len(train_y)} labels')
    if solver not in SOLVERS:
        raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}')
    device = torch.device(device)
    t0 = time.time()
    num_classes = num_classes or int(max(train_y.max(), test_y.max()).item()) + 1
    xtr, ytr = train_x.to(device, torch.float32), train_y.to(device)
    std = xtr.std(0, unbiased=False) + 1e-6
    if whiten:
        mean, P = whitening(xtr)
    else:
        mean, P = xtr.double().mean(0), torch.diag(1.0 / std.double())
    mean, P = mean.to(device), P.to(device)
    z = ((xtr.double() - mean) @ P).float()  # the map in float64: P may scale a direction by 1e5 or more
    W, b, iters = _solve(z, ytr, num_classes, solver, weight_decay, epochs, lr, batch_size, max_iter, tol, seed)
    W_x = (W.double() @ P.T).float()  # the classifier on centred features: logits = (x - mean) @ W_x^T + b
    mean = mean.float()
    with torch.no_grad():
        objective = (F.cross_entropy(z @ W.T + b, ytr) + 0.5 * weight_decay * W.square().sum()).item()
        logits = lambda x: (x.to(device, torch.float32) - mean) @ W_x.T + b  # noqa: E731
        result = dict(top1=_accuracy(logits, test_x, test_y.to(device)), train_top1=_accuracy(logits, xtr, ytr),
                      objective=objective, solver=solver, whiten=whiten, weight_decay=weight_decay, iterations=iters,
                      fit_s=round(time.time() - t0, 2))
    head = LinearProbeHead(xtr.shape[1], num_classes)
    head.bn.running_mean.copy_(mean.cpu())
    head.bn.running_var.copy_((std.square() - head.bn.eps).cpu())
    head.fc.weight.data.copy_((W_x * std).cpu())  # BatchNorm divides by std: the Linear multiplies it back
    head.fc.bias.data.copy_(b.cpu())
    result['head'] = head.eval()
    return result


def check_against_lbfgs(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                        max_iter: int = 5000, **kwargs: Any) -> Dict[str, Any]:
    """The fast probe against a reference: full-batch L-BFGS on the standardised (not whitened) features, run for up
    to ``max_iter`` iterations. Returns both top-1s and the objective each reached (lower is closer to the optimum)."""
    fast = fit_linear_probe(train_x, train_y, test_x, test_y, **kwargs)
    ref = fit_linear_probe(train_x, train_y, test_x, test_y, **{**kwargs, 'solver': 'lbfgs', 'whiten': False,
                                                                 'max_iter': max_iter})
    return dict(fast_top1=fast['top1'], lbfgs_top1=ref['top1'], fast_objective=fast['objective'],
                lbfgs_objective=ref['objective'], top1_gap=fast['top1'] - ref['top1'], fast_fit_s=fast['fit_s'],
                lbfgs_fit_s=ref['fit_s'], lbfgs_iterations=ref['iterations'], fast_solver=fast['solver'])


@torch.no_grad()
def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: Optional[int] = None,
                 device: Union[str, torch.device] = 'cpu', chunk: int = 1024) -> float:
    """Weighted kNN top-1 (%) with cosine similarity of features centred by the training mean (DINO's vote)."""
    device = torch.device(device)
    num_classes = num_classes or int(max(train_y.max(), test_y.max()).item()) + 1
    mean = train_x.mean(0).to(device)
    bank = F.normalize(train_x.to(device, torch.float32) - mean, dim=1)
    labels = train_y.to(device)
    correct = 0
    for i in range(0, len(test_x), chunk):
        q = F.normalize(test_x[i:i + chunk].to(device, torch.float32) - mean, dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk].to(device)).sum().item()
    return 100.0 * correct / max(1, len(test_x))


def grid_probe(
        model: nn.Module,
        train: ImageData,
        test: ImageData,
        layers: Sequence[int],
        ts: Sequence[Optional[float]],
        noisy_input: Optional[bool] = None,
        batch_size: int = 256,
        device: Union[str, torch.device] = 'cpu',
        seed: int = 0,
        knn: bool = False,
        progress: bool = False,
        **probe_kwargs: Any,
) -> Dict[GridKey, Dict[str, float]]:
    """Linear-probe top-1 (and kNN with ``knn``) for every (layer, t): the analysis of DDAE's Fig. 3.

    Features of both splits are extracted once (one pass per t per batch), then each cell is probed.
    """
    kw = dict(layers=list(layers), ts=list(ts), noisy_input=noisy_input, batch_size=batch_size, device=device,
              progress=progress)
    ftr = dataset_features(model, train, seed=seed, desc='train features', **kw)
    fte = dataset_features(model, test, seed=seed + 1, desc='test features', **kw)
    return probe_features(ftr, train.labels, fte, test.labels, device=device, seed=seed, knn=knn, **probe_kwargs)


def probe_features(ftr: FeatureDict, ytr: torch.Tensor, fte: FeatureDict, yte: torch.Tensor,
                   device: Union[str, torch.device] = 'cpu', seed: int = 0, knn: bool = False,
                   check_lbfgs: bool = False, **probe_kwargs: Any) -> Dict[GridKey, Dict[str, float]]:
    """Probe every key of extracted features: ``{key: {'top1', 'train_top1', 'fit_s'[, 'knn_top1'][, 'lbfgs_top1']}}``.

    ``check_lbfgs`` with ``solver='adam'`` also fits the full-batch L-BFGS probe, to show how far Adam stopped.
    """
    out = {}
    for key in ftr:
        r = fit_linear_probe(ftr[key], ytr, fte[key], yte, device=device, seed=seed, **probe_kwargs)
        cell = dict(top1=r['top1'], train_top1=r['train_top1'], fit_s=r['fit_s'])
        if knn:
            cell['knn_top1'] = knn_accuracy(ftr[key], ytr, fte[key], yte, device=device)
        if check_lbfgs and probe_kwargs.get('solver', 'lbfgs') != 'lbfgs':
            cell['lbfgs_top1'] = fit_linear_probe(ftr[key], ytr, fte[key], yte, device=device, seed=seed,
                                                  **{**probe_kwargs, 'solver': 'lbfgs'})['top1']
        out[key] = cell
    return out


# -- floors --------------------------------------------------------------------------------------------------------

def random_counterpart(model: nn.Module, seed: int = 0) -> nn.Module:
    """A randomly initialised network of the same shape: for a ViT-shaped encoder, timm's ``VisionTransformer`` with
    the merged encoder's arguments and timm's own initialisation (every block active, a stronger floor than the
    adaLN-Zero start, whose blocks are the identity); for anything else, the same class built afresh."""
    import timm
    from timm.models import VisionTransformer
    inner = getattr(model, 'model', model)
    vit_args = getattr(inner, 'vit_args', None) or getattr(getattr(inner, 'encoder', None), 'vit_args', None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if vit_args is not None:
            args = dict(vit_args() if callable(vit_args) else vit_args)
            args['depth'] = inner.num_taps  # a whole DAE: as many blocks as it has, encoder and decoder
            floor = VisionTransformer(**args)
        else:
            arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
            if not arch:
                raise ValueError(f'cannot build a random counterpart of {type(model).__name__}: no architecture known')
            floor = timm.create_model(arch, pretrained=False, **{k: v for k, v in getattr(model, '_model_args', {}).items()
                                                                if k != 'merged'})
    floor.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    return floor.eval()


def _pooled_pixels(x: torch.Tensor, max_dim: int) -> torch.Tensor:
    side = x.shape[-1]
    while x[0].numel() > max_dim and side > 1:
        side //= 2
        x = F.adaptive_avg_pool2d(x, side)
    return x.flatten(1)


def pixel_features(data: Union[ImageData, Split], max_dim: int = 3072, mean: Sequence[float] = (0.5,) * 3,
                   std: Sequence[float] = (0.5,) * 3, size: Optional[int] = None) -> torch.Tensor:
    """Raw pixels as features (N, C*H*W), normalised; images larger than ``max_dim`` values are average-pooled to fit
    (32 x 32 x 3 = 3072 for CIFAR-10 is kept as it is). A ``Split`` is streamed, cropped to ``size``."""
    with contextlib.closing(read_batches(data, list(sequential(len(data), 4096)), size, 'cpu')) as batches:
        return torch.cat([_pooled_pixels(normalize(images, mean, std), max_dim) for images, _ in batches])


def floors(model: nn.Module, train: Union[ImageData, Split], test: Union[ImageData, Split], layer: int = -1,
           knn: bool = True, batch_size: int = 256, device: Union[str, torch.device] = 'cpu', seed: int = 0,
           progress: bool = False, log: Any = None, workers: int = -1, bad: str = 'raise', on_bad: Any = None,
           **probe_kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """The two floors every probe table reports, measured on the same splits with the same probe: a randomly
    initialised network of the model's shape (``random_counterpart``, tapped at the same ``layer``) and the raw pixels
    (``pixel_features``), both from one pass over each split (streamed for a ``Split``). Returns
    ``{'random_same_shape': {...}, 'raw_pixels': {...}}`` with ``top1`` (and ``knn_top1``); ``log`` (a callable) is
    told each stage; ``bad='drop'`` leaves unreadable images out (with their labels)."""
    log = log or (lambda msg: None)
    rand = random_counterpart(model, seed=seed).to(device)
    ext = as_extractor(rand)

    def both(x: torch.Tensor) -> Dict[Any, torch.Tensor]:
        f = ext.extract_features(x, layers=[layer])
        return {'random_same_shape': next(iter(f.values())), 'raw_pixels': _pooled_pixels(x, 3072)}

    log('floors: a random network of the same shape, and raw pixels')
    labels: Dict[str, List[torch.Tensor]] = {'train': [], 'test': []}
    kw = dict(batch_size=batch_size, device=device, progress=progress, fn=both, workers=workers, bad=bad,
              on_bad=on_bad)
    ftr = dataset_features(rand, train, desc='train floors', sink=lambda f, y: labels['train'].append(y), **kw)
    fte = dataset_features(rand, test, desc='test floors', sink=lambda f, y: labels['test'].append(y), **kw)
    ytr, yte = torch.cat(labels['train']), torch.cat(labels['test'])
    out = {}
    for name, info in (('random_same_shape', dict(model=type(rand).__name__)),
                       ('raw_pixels', dict(dim=ftr['raw_pixels'].shape[1]))):
        cell = probe_features({name: ftr[name]}, ytr, {name: fte[name]}, yte, device=device,
                              seed=seed, knn=knn, **probe_kwargs)[name]
        out[name] = dict(info, **cell)
    return out


# -- a classifier ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def classifier_top1(model: nn.Module, data: Union[ImageData, Split], img_size: int,
                    device: Union[str, torch.device] = 'cpu', mean: Sequence[float] = (0.5,) * 3,
                    std: Sequence[float] = (0.5,) * 3, rank: int = 0, world: int = 1, workers: int = -1,
                    progress: bool = False, batch_size: int = 256) -> float:
    """Top-1 (%) of a classifier of normalised images on ``data`` (center squares of ``img_size``), under bf16
    autocast on a GPU; with ``world`` processes each takes its share and the counts are summed."""
    device = torch.device(device)
    was = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else torch.autocast('cpu', enabled=False)
    with Progress(len(data), 'test', enabled=progress) as bar, contextlib.closing(read_batches(
            data, sequential(len(data), batch_size, rank, world), img_size, device, workers)) as batches:
        for images, labels in batches:
            with amp:
                logits = model(normalize(images, mean, std))
            counts[0] += (logits.argmax(1) == labels).sum()
            counts[1] += len(labels)
            bar.update(len(labels) * world)
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(counts)
    model.train(was)
    return 100.0 * counts[0].item() / max(1.0, counts[1].item())


# -- reporting --------------------------------------------------------------------------------------------------------

def grid_to_json(results: Dict[GridKey, Dict[str, float]]) -> List[Dict[str, Any]]:
    return [dict(layer=k[0], t=k[1], key=feature_key(*k), **v) for k, v in sorted(
        results.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1]))]


def write_json(path: str, obj: Any) -> None:
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
