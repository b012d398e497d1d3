"""The paper's central comparisons at small scale on CIFAR-10, with the same training budget for every row.

Rows: l-DAE (latent noise), the classical DAE (pixel noise, predict the image, plain MSE), a randomly
initialised encoder (no training), and optionally l-DAE at other latent dimensions d (the paper's Tab. 2).
Each trained row runs ``ldae_models.train`` for ``--steps`` steps of ``--batch-size``; every encoder is then
measured by the fast linear probe (features once, clean input, t = 10, MAE's BN + linear head), and the l-DAE
row also over t in {0, 10, 20, 40, 80} with clean and noisy input (the paper's App. A table).

    python ../shared/data/cifar10/materialize.py /data/cifar10          # ImageFolder: train/ and test/
    python benchmarks/cifar10_small_scale.py --data-dir /data/cifar10 --out runs/bench --steps 250 --batch-size 128

Writes OUT/results.json, OUT/results.md and OUT/results.png.
"""
import argparse
import json
import time
from pathlib import Path

import timm
import torch

import ldae_models  # noqa: F401
from ldae_models import train as T
from ldae_models.probe import _load_split, fit_linear_probe, grid_features


def train_row(name, extra, args, out):
    run = out / name
    argv = ['--model', args.model, '--data-dir', args.data_dir, '--out', str(run), '--batch-size', str(args.batch_size),
            '--max-steps', str(args.steps), '--lr', str(args.lr), '--warmup-epochs', str(args.warmup_epochs),
            '--workers', str(args.workers), '--log-every', '25', '--ckpt-every', '100000', '--quiet',
            '--pca-images', str(args.pca_images), '--seed', str(args.seed), *extra]
    t0 = time.time()
    res = T.train(T.build_parser().parse_args(argv))
    return run / 'model.safetensors', time.time() - t0, res['last']


def encoder_from(weights, extra_model_args):
    kw = dict(extra_model_args)
    if kw.pop('timm_vit', False):
        from timm.models import VisionTransformer
        with torch.random.fork_rng():
            torch.manual_seed(0)
            args = timm.create_model(ARGS.model, merged=False).vit_args()
            vit = VisionTransformer(**args).eval()
        vit.merged_t = 10  # a plain ViT: extract_features treats it as fixed-t
        return vit
    if weights is None:
        torch.manual_seed(0)
        return timm.create_model(ARGS.model, merged=False, **kw).eval()
    return timm.create_model(ARGS.model, pretrained=True, merged=False, pretrained_cfg_overlay=dict(file=str(weights)),
                             **kw).eval()


def probe(enc, data, ts=(10,), noise=False):
    (trx, try_), (tex, tey) = data
    last = len(enc.blocks) - 1
    ftr = grid_features(enc, trx, [last], list(ts), noise=noise, seed=ARGS.seed)
    fte = grid_features(enc, tex, [last], list(ts), noise=noise, seed=ARGS.seed + 1)
    return {t: fit_linear_probe(ftr[(last, t)], try_, fte[(last, t)], tey, num_classes=10, epochs=ARGS.probe_epochs,
                                seed=ARGS.seed)['top1'] for t in ts}


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data-dir', required=True)
    ap.add_argument('--out', required=True)
    ap.add_argument('--model', default='ldae_vit_tiny_patch4_32')
    ap.add_argument('--steps', type=int, default=250, help='training steps per row (the budget)')
    ap.add_argument('--batch-size', type=int, default=128)
    ap.add_argument('--lr', type=float, default=1.5e-4)
    ap.add_argument('--warmup-epochs', type=float, default=0.05)
    ap.add_argument('--pca-images', type=int, default=10000)
    ap.add_argument('--latent-dims', type=int, nargs='*', default=[], help='extra l-DAE rows at these d')
    ap.add_argument('--probe-train', type=int, default=10000, help='probe training images (0: all 50,000)')
    ap.add_argument('--probe-test', type=int, default=2000, help='probe test images (0: all 10,000)')
    ap.add_argument('--probe-epochs', type=int, default=30)
    ap.add_argument('--no-t-sweep', action='store_true')
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--seed', type=int, default=0)
    ARGS = args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from torchvision import transforms as TT
    tf = TT.Compose([TT.ToTensor(), TT.Normalize((0.5,) * 3, (0.5,) * 3)])
    data = (_load_split(str(Path(args.data_dir) / 'train'), tf, args.probe_train),
            _load_split(str(Path(args.data_dir) / 'test'), tf, args.probe_test))
    rows = [('ldae', 'l-DAE (latent noise)', [], {}),
            ('pixel_dae', 'classical DAE (pixel noise, plain MSE)', ['--noise-space', 'pixel', '--residual-weight', '1'],
             {'noise_space': 'pixel'}),
            ('random', 'random initialisation of the DAE (adaLN-Zero: blocks start as identity)', None, {}),
            ('random_vit', "random ViT of the same size (timm's init, all blocks active)", None, {'timm_vit': True})]
    rows += [(f'ldae_d{d}', f'l-DAE, d = {d}', ['--latent-dim', str(d)], {'latent_dim': d}) for d in args.latent_dims]
    results = dict(config=vars(args), device='cuda' if torch.cuda.is_available() else 'cpu', rows=[])
    for key, label, extra, model_args in rows:
        weights, wall, last = (None, 0.0, None) if extra is None else train_row(key, extra, args, out)
        enc = encoder_from(weights, model_args)
        top1 = probe(enc, data)[10]
        row = dict(key=key, label=label, top1_t10=top1, train_wall_s=round(wall, 1), last_log=last)
        if key == 'ldae' and not args.no_t_sweep:
            ts = (0, 10, 20, 40, 80)
            row['t_sweep_clean'] = probe(enc, data, ts, noise=False)
            row['t_sweep_noisy'] = probe(enc, data, ts, noise=True)
        results['rows'].append(row)
        print(json.dumps(row), flush=True)
        (out / 'results.json').write_text(json.dumps(results, indent=2))
    write_report(results, out)


def write_report(results, out):
    cfg = results['config']
    lines = [f"CIFAR-10 (JPEG copy), {cfg['model']}, {cfg['steps']} steps x batch {cfg['batch_size']} per trained row "
             f"({cfg['steps'] * cfg['batch_size'] / 50000:.2f} epochs), device {results['device']}; fast linear probe "
             f"on {cfg['probe_train'] or 50000} train / {cfg['probe_test'] or 10000} test images, clean input, t = 10.",
             '', '| row | top-1 (%) | training wall time (s) |', '|---|---|---|']
    lines += [f"| {r['label']} | {r['top1_t10']:.2f} | {r['train_wall_s']} |" for r in results['rows']]
    sweep = next((r for r in results['rows'] if 't_sweep_clean' in r), None)
    if sweep:
        ts = list(sweep['t_sweep_clean'])
        lines += ['', '| transfer t | ' + ' | '.join(map(str, ts)) + ' |', '|---|' + '---|' * len(ts),
                  '| clean input | ' + ' | '.join(f"{sweep['t_sweep_clean'][t]:.2f}" for t in ts) + ' |',
                  '| noisy input | ' + ' | '.join(f"{sweep['t_sweep_noisy'][t]:.2f}" for t in ts) + ' |']
    (out / 'results.md').write_text('\n'.join(lines) + '\n')
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11 if sweep else 6, 3.6))
    axes = axes if sweep else [axes]
    labels = [r['label'].split(' (')[0] + ('' if '(' not in r['label'] else '') for r in results['rows']]
    axes[0].barh(labels, [r['top1_t10'] for r in results['rows']], color='tab:blue')
    axes[0].set_xlabel('linear probe top-1 (%)')
    axes[0].invert_yaxis()
    if sweep:
        ts = [int(t) for t in sweep['t_sweep_clean']]
        axes[1].plot(ts, list(sweep['t_sweep_clean'].values()), 'o-', label='clean input')
        axes[1].plot(ts, list(sweep['t_sweep_noisy'].values()), 's--', label='noisy input')
        axes[1].set_xlabel('transfer timestep t')
        axes[1].set_ylabel('top-1 (%)')
        axes[1].legend()
    fig.suptitle(f"CIFAR-10, {cfg['steps']} steps x {cfg['batch_size']} per row")
    fig.tight_layout()
    fig.savefig(out / 'results.png', dpi=110)


if __name__ == '__main__':
    main()
