"""How much a CIFAR-10 number measured on a JPEG re-encoding differs from one on the original pixels.

Two files are compared: a JPEG re-encoding of the whole CIFAR-10 (``--jpeg-npz``: ``{split}_jpeg`` +
``{split}_offsets`` + ``y_{split}``, the kind ``--dataset npz`` reads) and a subset with the exact original pixels
(``--exact-npz``: ``x_{split}`` + ``y_{split}``, 500 train / 100 test). Each exact image is matched to its JPEG
version (the nearest image of its class by mean absolute error; the gap to the second nearest is reported, so that a
wrong match would show), then, for one checkpoint at (block, t):

- ``probe_10k``: a linear probe (the zoo's L-BFGS probe) fitted on ``--train-images`` JPEG train images, evaluated
  on the exact test images and on their JPEG versions: top-1 on both, and how many predictions agree (also with a
  penalty of 1e-4);
- ``probe_500``: a probe fitted on the 500 exact train images and tested on the 100 exact test images, against the
  same fitted on the 500 JPEG versions and tested on the 100 JPEG versions;
- the relative difference of the features of the exact and the JPEG versions;

each for the checkpoint and for the floors: a randomly initialised network of its shape and the raw pixels.

    ldae-models pack --dataset cifar10 --data-root ~/data --download --out cifar10.npz           # JPEG, quality 95
    ldae-models pack --dataset cifar10 --data-root ~/data --raw --max-train 500 --max-test 100 --out cifar10-exact.npz
    python benchmarks/bench_exact_pixels.py --jpeg-npz cifar10.npz --exact-npz cifar10-exact.npz \\
        --out runs/exact_pixels.json
"""
import argparse
import json
import time
from pathlib import Path

import torch

from ldae_models.data import ImageData, load_split
from ldae_models.features import dataset_features
from ldae_models.models import load_model
from ldae_models.probe import fit_linear_probe, pixel_features, random_counterpart, write_json


def match(exact: ImageData, jpeg: ImageData):
    """For each exact image, the index of its JPEG version (same label, least mean absolute error), the MAE (/255) and
    the MAE of the second nearest."""
    idx, best, second = [], [], []
    jf = jpeg.images.flatten(1).float()
    for i in range(len(exact)):
        cand = (jpeg.labels == exact.labels[i]).nonzero()[:, 0]
        d = (jf[cand] - exact.images[i].flatten().float()).abs().mean(1)
        v, j = d.topk(2, largest=False)
        idx.append(int(cand[j[0]]))
        best.append(float(v[0]))
        second.append(float(v[1]))
    return torch.tensor(idx), torch.tensor(best), torch.tensor(second)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--jpeg-npz', required=True)
    ap.add_argument('--exact-npz', required=True)
    ap.add_argument('--model', default='ldae_vit_tiny_patch4_32.cifar10')
    ap.add_argument('--layer', type=int, default=-1)
    ap.add_argument('--t', type=float, default=None)
    ap.add_argument('--train-images', type=int, default=10_000)
    ap.add_argument('--out', required=True)
    args = ap.parse_args()
    t0 = time.time()
    model = load_model(args.model, merged=False).eval()
    t = model.t if args.t is None else args.t
    res = dict(model=args.model, layer=args.layer, t=t)
    def feats(m, d):
        kw = dict(layers=[args.layer], ts=[t]) if m is model else dict(layers=[args.layer])
        return next(iter(dataset_features(m, d, progress=False, **kw).values()))
    split = {}
    for name in ('train', 'test'):
        exact = load_split('npz', args.exact_npz, name)
        jpeg = load_split('npz', args.jpeg_npz, name, progress=False)
        idx, best, second = match(exact, jpeg)
        res[f'match_{name}'] = dict(n=len(exact), mae_255_mean=round(best.mean().item(), 3),
                                    mae_255_max=round(best.max().item(), 3),
                                    second_nearest_mae_255_min=round(second.min().item(), 3),
                                    margin_255_min=round((second - best).min().item(), 3),
                                    distinct=len(set(idx.tolist())) == len(idx))
        split[name] = (exact, ImageData(jpeg.images[idx], jpeg.labels[idx], jpeg.classes), jpeg)
    (ex_tr, jp_tr, jpeg_train), (ex_te, jp_te, _) = split['train'], split['test']
    sub = jpeg_train.subset(args.train_images, seed=0)
    top1 = lambda pred: round((pred == ex_te.labels).float().mean().item() * 100, 2)  # noqa: E731
    # the checkpoint, and the floors of every table: a random network of its shape, the raw pixels
    rand = random_counterpart(model, seed=0).eval()
    extractors = {
        'model': lambda d: feats(model, d),
        'random_same_shape': lambda d: feats(rand, d),
        'raw_pixels': lambda d: pixel_features(d),
    }
    for name, fx in extractors.items():
        f = {k: fx(d) for k, d in dict(ex_tr=ex_tr, jp_tr=jp_tr, ex_te=ex_te, jp_te=jp_te, tr=sub).items()}
        row = dict(feature_rel_diff=round(((f['ex_te'] - f['jp_te']).norm(dim=1) / f['ex_te'].norm(dim=1)).mean().item(),
                                          4))
        for wd in (0.0, 1e-4):
            head = fit_linear_probe(f['tr'], sub.labels, f['ex_te'], ex_te.labels, weight_decay=wd)['head']
            with torch.no_grad():
                pred_ex, pred_jp = head(f['ex_te']).argmax(1), head(f['jp_te']).argmax(1)
            row['probe_10k' if wd == 0 else 'probe_10k_wd1e-4'] = dict(
                train=len(sub), test=len(ex_te), weight_decay=wd, exact_top1=top1(pred_ex), jpeg_top1=top1(pred_jp),
                agreement=round((pred_ex == pred_jp).float().mean().item() * 100, 2))
        a = fit_linear_probe(f['ex_tr'], ex_tr.labels, f['ex_te'], ex_te.labels)
        b = fit_linear_probe(f['jp_tr'], jp_tr.labels, f['jp_te'], jp_te.labels)
        row['probe_500'] = dict(train=len(ex_tr), test=len(ex_te), exact_top1=a['top1'], jpeg_top1=b['top1'])
        res[name] = row
    res['seconds'] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, res)


if __name__ == '__main__':
    main()
