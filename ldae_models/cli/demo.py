"""``ldae-models demo`` and its two halves: ``features`` (pooled features of images at layers and t) and ``denoise``
(the paper's Fig. 8 for a trained l-DAE)."""
import argparse
import os
import shutil
import tempfile
from typing import Dict, List, Tuple

import torch

from .common import DEFAULT_MODEL, add_model_args, json_object, load_cli_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('demo', help='the shipped model at work: features and a denoising figure',
                       description='Load the l-DAE shipped inside the package (offline), extract pooled features of '
                                   "sample photos (matplotlib's, or --images) at blocks 5 and 11 and t = 0, 10, 80, "
                                   'save them, and write the denoising figure (clean / noised / denoised).')
    p.add_argument('--model', default=DEFAULT_MODEL, help='l-DAE NAME.TAG with full-DAE weights (default: %(default)s)')
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=float, default=500, help='noise level of the figure (default: %(default)s)')
    p.add_argument('--out-dir', default='.', help='where features.safetensors and denoising.png go (default: .)')
    p.set_defaults(run=run_demo)

    p = sub.add_parser('features', help='extract pooled features of images',
                       description='Extract pooled encoder features of images (default: sample photos shipped with '
                                   'matplotlib) at chosen layers and timesteps, print and save them.')
    add_model_args(p)
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=float, help="the encoder's fixed t (default: the one it was trained for)")
    p.add_argument('--layers', type=int, nargs='+', help='0-based block indices (default: the last)')
    p.add_argument('--ts', type=float, nargs='+', help='timesteps to tap (default: the fixed t)')
    p.add_argument('--noisy-input', action='store_true', help="add the model's training noise at each t first")
    p.add_argument('--seed', type=int, default=0, help='seed of the noise')
    p.add_argument('--out', help='save the features to this .safetensors file')
    p.set_defaults(run=run_features)

    p = sub.add_parser('denoise', help='denoising figure of a trained l-DAE', description="Write the paper's Fig. 8 "
                       'for a trained DAE: clean / latent-noised / denoised, one row per image, with MSEs.')
    p.add_argument('--model', default=DEFAULT_MODEL, help='l-DAE size or NAME.TAG (default: %(default)s)')
    p.add_argument('--checkpoint', help='full-DAE weights (OUT/model.safetensors of ldae-models train)')
    p.add_argument('--model-args', help='JSON object of model keyword arguments')
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=float, default=500, help='noise level as a timestep (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='denoising.png', help='output PNG (default: %(default)s)')
    p.set_defaults(run=run_denoise)


def sample_image_paths() -> List[str]:
    """Photos that ship with matplotlib (the ``demo`` extra), used when no --images are given."""
    try:
        from matplotlib import cbook
    except ImportError:
        raise ImportError('no --images given and matplotlib (for its sample images) is not installed: '
                          'pip install "ldae-models[demo]" or pass --images FILE ...') from None
    names = ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png', 'logo2.png')
    return [str(cbook.get_sample_data(n, asfileobj=False)) for n in names]


def _images(paths: List[str], cfg: Dict) -> torch.Tensor:
    """Image files through the one decoder (shorter side to the model's size, center square), normalised as the
    model's pretrained cfg says."""
    from ..data import normalize, read_images
    return normalize(read_images(paths, int(cfg['input_size'][-1])), cfg.get('mean', (0.5,) * 3),
                     cfg.get('std', (0.5,) * 3))


def features(args: argparse.Namespace) -> Tuple[List[str], Dict[str, torch.Tensor], List[str]]:
    """(the lines to print, the features as named tensors, the image paths) of the ``features`` command."""
    from ..features import extract_features, feature_key
    paths = args.images or sample_image_paths()
    model = load_cli_model(args, merged=False, **({} if args.t is None else {'t': args.t}))
    tokenizer = getattr(model, 'tokenizer', None)
    if args.noisy_input and tokenizer is not None and not tokenizer.fitted:
        raise ValueError(f'--noisy-input needs the fitted PCA tokenizer that a trained checkpoint carries; '
                         f'{args.model} has random weights here (give a tag, e.g. {DEFAULT_MODEL})')
    channels = model.pretrained_cfg['input_size'][0]
    if channels != 3:
        raise ValueError(f'{args.model} takes {channels}-channel inputs (SD-VAE latents), not RGB images: pass '
                         f'--model-args \'{{"vae": "stabilityai/sd-vae-ft-ema"}}\' to encode images with the VAE '
                         f'(needs diffusers)')
    images = _images(paths, model.pretrained_cfg)
    has = bool(model.pretrained_cfg.get('tag') or args.checkpoint or args.model.startswith(('hf-hub:', 'local-dir:')))
    lines = [f'{args.model}: {"pretrained weights" if has else "random weights (untrained: give a tag for trained ones)"}; '
             f'{len(paths)} images {tuple(images.shape[1:])}']
    if not has:
        lines.append('  note: untrained DiT-style blocks start as the identity (adaLN-Zero), so these features do not '
                     'yet vary with the layer or t')
    feats = extract_features(model, images, layers=args.layers or [-1], ts=args.ts, noisy_input=args.noisy_input,
                             generator=torch.Generator().manual_seed(args.seed))
    tensors = {}
    for (layer, t), f in feats.items():
        lines.append(f'  layer {layer:>3} t {t:>6g}: features {tuple(f.shape)}  mean {f.mean():+.4f}  std '
                     f'{f.std():.4f}  first {[round(v, 4) for v in f[0, :4].tolist()]}')
        tensors[feature_key(layer, t)] = f.contiguous()
    return lines, tensors, paths


def run_features(args: argparse.Namespace) -> int:
    from ..hub.publish import save_safetensors
    lines, tensors, paths = features(args)
    print('\n'.join(lines))
    if args.out:
        save_safetensors(tensors, args.out, metadata={'model': args.model, 'images': '\n'.join(paths)})
        print(f'wrote {args.out}')
    return 0


def denoise(args: argparse.Namespace, out: str) -> List[str]:
    """The paper's Fig. 8 written to ``out``: clean image, its latent-noised version (the network input), the
    denoised output. Returns the lines to print."""
    from ..models import full_model, names_weights
    if not args.checkpoint and not names_weights(args.model):
        raise ValueError(f'{args.model} names no weights: give a tag (e.g. {DEFAULT_MODEL}) or --checkpoint FILE')
    dae = full_model(args.model, pretrained=not args.checkpoint, checkpoint=args.checkpoint,
                     **json_object(args.model_args)).eval()
    if not hasattr(dae, 'tokenizer'):
        raise ValueError(f'{args.model} is not an l-DAE: denoise draws the l-DAE figure')
    if not dae.tokenizer.fitted:
        raise ValueError(f'{args.checkpoint or args.model} carries no fitted PCA tokenizer')
    size = dae.encoder.patch_embed.img_size[-1]
    images = _images(args.images or sample_image_paths(), dict(input_size=(3, size, size)))
    with torch.no_grad():
        noisy, _ = dae.add_noise(images, args.t, generator=torch.Generator().manual_seed(args.seed))
        pred = dae.denoise(noisy, args.t)
    from ..plots import denoising_figure
    rows = denoising_figure(images, noisy, pred, args.t, out)
    return [f'  image {i}: MSE noised {r["mse_noisy"]:.4f} -> denoised {r["mse_denoised"]:.4f}'
            for i, r in enumerate(rows)] + [f'{len(images)} rows of clean / noised (t={args.t:g}) / denoised']


def run_denoise(args: argparse.Namespace) -> int:
    lines = denoise(args, args.out)
    print('\n'.join(lines[:-1]) + f'\nwrote {args.out}: {lines[-1]}')
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The main job in one command: the denoising figure and features of sample images, offline. Both files appear
    only when both are made (they are written in a temporary folder first)."""
    from ..hub.publish import save_safetensors
    os.makedirs(args.out_dir, exist_ok=True)
    common = dict(model=args.model, images=args.images, checkpoint=None, model_args=None)
    fig, feats = os.path.join(args.out_dir, 'denoising.png'), os.path.join(args.out_dir, 'features.safetensors')
    with tempfile.TemporaryDirectory(dir=args.out_dir, prefix='.demo-') as tmp:
        lines = denoise(argparse.Namespace(**common, t=args.t, seed=0), os.path.join(tmp, 'denoising.png'))
        flines, tensors, paths = features(argparse.Namespace(**common, pretrained=None, t=None, layers=[5, 11],
                                                             ts=[0, 10, 80], noisy_input=False, seed=0))
        save_safetensors(tensors, os.path.join(tmp, 'features.safetensors'),
                         metadata={'model': args.model, 'images': '\n'.join(paths)})
        shutil.move(os.path.join(tmp, 'denoising.png'), fig)
        shutil.move(os.path.join(tmp, 'features.safetensors'), feats)
    print('\n'.join(lines[:-1]) + f'\nwrote {fig}: {lines[-1]}')
    print('\n'.join(flines) + f'\nwrote {feats}')
    return 0
