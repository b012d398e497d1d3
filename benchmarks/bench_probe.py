"""The linear probe, old against new, on one checkpoint and its floors, side by side in one run.

On the full CIFAR-10 (JPEG copy; 50,000 train / 10,000 test), features of the model's last encoder block at its t,
clean input, extracted once (timed), then:

- ``old``: the fast probe of ldae-models 0.1, reproduced below: MAE's head (BatchNorm1d without affine + Linear)
  trained on raw features by Adam (lr 1e-3, batch 128, 30 epochs, cosine);
- ``new``: ``fit_linear_probe`` (whitened features, full-batch L-BFGS), and its mini-batch Adam solver;
- ``reference``: full-batch L-BFGS on the standardised features (no whitening), run for up to ``--ref-iters``
  iterations: the check that the new probe reaches the optimum of the convex problem;
- ``knn``: k = 20, cosine (centred), DINO's weighted vote.

The same is done for a randomly initialised timm ViT of the same shape and for the raw pixels (the floors).

    ldae-models pack --dataset cifar10 --data-root ~/data --download --out cifar10.npz   # torchvision's CIFAR-10
    python benchmarks/bench_probe.py --model ldae_vit_tiny_patch4_32.cifar10 --npz cifar10.npz --out OUT.json
"""
import argparse
import json
import math
import time
from typing import Any, Dict

import torch
import torch.nn.functional as F

from ldae_models.data import load_split
from ldae_models.features import dataset_features
from ldae_models.models import load_model
from ldae_models.probe import LinearProbeHead, check_against_lbfgs, fit_linear_probe, knn_accuracy, pixel_features, \
    random_counterpart, write_json


def old_fast_probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, epochs: int = 30,
                   seed: int = 0) -> float:
    """ldae-models 0.1's fast probe (DDAE's optimiser on MAE's head), as it was."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearProbeHead(xtr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    steps = epochs * math.ceil(len(xtr) / 128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 128):
            idx = perm[i:i + 128]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        return 100.0 * (head(xte).argmax(1) == yte).float().mean().item()


def timed(fn: Any, *args: Any, **kwargs: Any):
    t0 = time.time()
    out = fn(*args, **kwargs)
    return out, round(time.time() - t0, 1)


def probe_all(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, ref_iters: int,
              old: bool = True) -> Dict[str, Any]:
    row: Dict[str, Any] = {}
    if old:
        row['old_top1'], row['old_s'] = timed(old_fast_probe, xtr, ytr, xte, yte)
    new, row['new_s'] = timed(fit_linear_probe, xtr, ytr, xte, yte)
    row.update(new_top1=new['top1'], new_objective=new['objective'], new_iterations=new['iterations'])
    adam, row['adam_s'] = timed(fit_linear_probe, xtr, ytr, xte, yte, solver='adam')
    row.update(adam_top1=adam['top1'], adam_objective=adam['objective'])
    check = check_against_lbfgs(xtr, ytr, xte, yte, max_iter=ref_iters)
    row.update(reference_top1=check['lbfgs_top1'], reference_objective=check['lbfgs_objective'],
               reference_iterations=check['lbfgs_iterations'], reference_s=check['lbfgs_fit_s'])
    row['knn_top1'], row['knn_s'] = timed(knn_accuracy, xtr, ytr, xte, yte)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='ldae_vit_tiny_patch4_32.cifar10')
    ap.add_argument('--npz', required=True, help="CIFAR-10 in the npz layout ({split}_jpeg + {split}_offsets, y_{split}; see the README's Data)")
    ap.add_argument('--ref-iters', type=int, default=5000)
    ap.add_argument('--batch-size', type=int, default=500)
    ap.add_argument('--out')
    args = ap.parse_args()
    train, test = load_split('npz', args.npz, 'train'), load_split('npz', args.npz, 'test')
    model = load_model(args.model, merged=False).eval()
    result: Dict[str, Any] = dict(model=args.model, data='CIFAR-10 (JPEG copy)', n_train=len(train), n_test=len(test),
                                  layer=model.num_taps - 1, t=model.t, input='clean', threads=torch.get_num_threads())
    for name, net in (('model', model), ('random_vit', random_counterpart(model))):
        t0 = time.time()
        ftr = dataset_features(net, train, layers=[-1], batch_size=args.batch_size, desc=f'{name} train')
        fte = dataset_features(net, test, layers=[-1], batch_size=args.batch_size, desc=f'{name} test')
        extract_s = round(time.time() - t0, 1)
        (k,) = ftr
        result[name] = dict(extract_s=extract_s, dim=ftr[k].shape[1],
                            **probe_all(ftr[k], train.labels, fte[k], test.labels, args.ref_iters))
    ptr, pte = pixel_features(train), pixel_features(test)
    result['raw_pixels'] = dict(dim=ptr.shape[1], **probe_all(ptr, train.labels, pte, test.labels, args.ref_iters,
                                                              old=False))
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)


if __name__ == '__main__':
    main()
