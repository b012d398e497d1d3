"""Measure one trained l-DAE checkpoint on CIFAR-10: the numbers of its model card.

1. The headline: the fast linear probe (features of clean test images at t = 10 from the last encoder block,
   MAE's BatchNorm + linear head, Adam) on all 50,000 training and 10,000 test images.
2. The same probe on a randomly initialised timm ViT of the same size, the baseline every number is read against.
3. A (block, t) grid on a subset, clean and noisy input: the transfer t sweep of the paper (t = 0, 10, 20, 40, 80)
   at several depths, drawn as heat maps.

    python benchmarks/eval_checkpoint.py --model ldae_vit_tiny_patch4_32.cifar10 --data-dir data/cifar10 \
        --out runs/eval_tiny

``--model`` is a tag (or a name with ``--checkpoint FILE``). Writes ``eval.json`` and the heat maps
``grid_clean.png`` and ``grid_noisy.png``. Runs on the CPU (as measured for the shipped model's card).
"""
import argparse
import json
import time
from pathlib import Path

import timm
import torch

import ldae_models  # noqa: F401
from ldae_models.probe import _load_split, fit_linear_probe, grid_features, plot_grid


def random_vit(name: str, seed: int = 0) -> torch.nn.Module:
    """A plain timm ViT with the merged encoder's shape and timm's own random initialisation (all blocks active)."""
    from timm.models import VisionTransformer
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with torch.device('meta'):
            args = timm.create_model(name.split('.')[0], merged=False).vit_args()
        vit = VisionTransformer(**args).eval()
    vit.merged_t = 10  # a plain ViT: extract_features treats it as fixed-t
    return vit


def probe(enc, data, layers, ts, noise, args):
    (trx, try_), (tex, tey) = data
    t0 = time.time()
    ftr = grid_features(enc, trx, layers, ts, noise=noise, seed=args.seed)
    fte = grid_features(enc, tex, layers, ts, noise=noise, seed=args.seed + 1)
    extract_s = time.time() - t0
    top1 = {k: fit_linear_probe(ftr[k], try_, fte[k], tey, num_classes=10, epochs=args.probe_epochs,
                                seed=args.seed)['top1'] for k in ftr}
    return top1, extract_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='ldae_vit_tiny_patch4_32.cifar10')
    ap.add_argument('--checkpoint', help='weights file (instead of the tag\'s)')
    ap.add_argument('--data-dir', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--probe-epochs', type=int, default=30)
    ap.add_argument('--grid-train', type=int, default=10000, help='grid: training images (0: all)')
    ap.add_argument('--grid-test', type=int, default=2000, help='grid: test images (0: all)')
    ap.add_argument('--grid-layers', type=int, nargs='*', default=[3, 5, 7, 9, 11])
    ap.add_argument('--grid-ts', type=float, nargs='*', default=[0, 10, 20, 40, 80])
    ap.add_argument('--skip', nargs='*', default=[], choices=['full', 'random', 'grid'])
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    kw = dict(pretrained_cfg_overlay=dict(file=args.checkpoint)) if args.checkpoint else {}
    enc = timm.create_model(args.model, pretrained=True, merged=False, **kw).eval()
    last = len(enc.blocks) - 1
    from torchvision import transforms as TT
    tf = TT.Compose([TT.ToTensor(), TT.Normalize((0.5,) * 3, (0.5,) * 3)])
    root = Path(args.data_dir)
    res = dict(config=vars(args), device='cpu', threads=torch.get_num_threads())
    path = out / 'eval.json'

    if 'full' not in args.skip or 'random' not in args.skip:
        full = (_load_split(str(root / 'train'), tf, 0), _load_split(str(root / 'test'), tf, 0))
        res['full_sizes'] = [len(full[0][1]), len(full[1][1])]
        if 'full' not in args.skip:
            top1, s = probe(enc, full, [last], [10], False, args)
            res['full_t10_clean'] = dict(top1=top1[(last, 10)], extract_s=round(s, 1))
            print(json.dumps(dict(full_t10_clean=res['full_t10_clean'])), flush=True)
        if 'random' not in args.skip:
            top1, s = probe(random_vit(args.model, args.seed), full, [last], [10], False, args)
            res['full_random_vit'] = dict(top1=top1[(last, 10)], extract_s=round(s, 1))
            print(json.dumps(dict(full_random_vit=res['full_random_vit'])), flush=True)
        path.write_text(json.dumps(res, indent=2))
        del full

    if 'grid' not in args.skip:
        sub = (_load_split(str(root / 'train'), tf, args.grid_train), _load_split(str(root / 'test'), tf, args.grid_test))
        res['grid_sizes'] = [len(sub[0][1]), len(sub[1][1])]
        for noise in (False, True):
            top1, s = probe(enc, sub, args.grid_layers, args.grid_ts, noise, args)
            key = 'grid_noisy' if noise else 'grid_clean'
            res[key] = [dict(layer=k[0], t=k[1], top1=v) for k, v in sorted(top1.items())]
            plot_grid(top1, str(out / f'{key}.png'), title=f'{args.model}: probe top-1 (%), '
                      f'{"noisy" if noise else "clean"} input', layer_label='encoder block (0-based)')
            print(json.dumps({key: res[key]}), flush=True)
            path.write_text(json.dumps(res, indent=2))
    path.write_text(json.dumps(res, indent=2))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
