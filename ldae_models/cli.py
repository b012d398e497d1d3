"""Command line: ``ldae-models`` (also ``python -m ldae_models``).

    ldae-models features                      # features of sample images, default model
    ldae-models features --layers 5 11 --ts 0 10 80 --noise --out feats.safetensors
"""
import argparse
import os
import sys
from typing import List, Optional

import torch

__all__ = ['main']


def sample_image_paths() -> List[str]:
    """Photos that ship with matplotlib (the ``demo`` extra), used when no --images are given."""
    try:
        from matplotlib import cbook
    except ImportError as e:
        raise SystemExit('no --images given and matplotlib (for its sample images) is not installed: '
                         'pip install "ldae-models[demo]" or pass --images FILE ...') from e
    names = ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png', 'logo2.png')
    return [str(cbook.get_sample_data(n, asfileobj=False)) for n in names]


def load_images(paths: List[str], model: torch.nn.Module) -> torch.Tensor:
    """Read images with PIL and apply the model's own eval transform (resize, center crop, normalise)."""
    from PIL import Image
    import timm.data
    cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f'image not found: {p}')
        with Image.open(p) as im:
            out.append(transform(im.convert('RGB')))
    return torch.stack(out)


def cmd_features(args: argparse.Namespace) -> int:
    import timm
    import ldae_models
    from safetensors.torch import save_file
    conditional = args.ts is not None or args.noise or args.layers is not None
    model = timm.create_model(args.model, pretrained=args.pretrained, t=args.t, merged=not conditional).eval()
    tokenizer = getattr(model, 'tokenizer', None)
    if args.noise and tokenizer is not None and not tokenizer.fitted:
        raise SystemExit(f'--noise needs the fitted PCA tokenizer that a trained checkpoint carries; {args.model} '
                         f'has random weights here (use --pretrained with a trained tag)')
    paths = args.images or sample_image_paths()
    images = load_images(paths, model)
    weights = 'pretrained weights' if args.pretrained else 'random weights (untrained: pass --pretrained for a trained tag)'
    print(f'{args.model}: {weights}; {len(paths)} images {tuple(images.shape[1:])}')
    if conditional:
        layers = args.layers if args.layers is not None else [-1]
        g = torch.Generator().manual_seed(args.seed)
        feats = ldae_models.extract_features(model, images, layers=layers, ts=args.ts or [args.t],
                                             noise=args.noise, generator=g)
    else:
        with torch.no_grad():
            feats = {(len(model.blocks) - 1, args.t): model(images)}
    tensors = {}
    for (layer, t), f in feats.items():
        print(f'  layer {layer:>3} t {t:>6}: features {tuple(f.shape)}  mean {f.mean():+.4f}  std {f.std():.4f}  '
              f'first {[round(v, 4) for v in f[0, :4].tolist()]}')
        tensors[f'layer{layer}_t{t}'] = f.contiguous()
    if args.out:
        save_file(tensors, args.out, metadata={'model': args.model, 'images': '\n'.join(paths)})
        print(f'wrote {args.out}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='ldae-models', description='Denoising-based self-supervised encoders for timm.')
    sub = ap.add_subparsers(dest='command', required=True)
    f = sub.add_parser('features', help='extract pooled features of images',
                       description='Extract pooled encoder features of images (default: sample photos '
                                   'shipped with matplotlib) and print or save them.')
    f.add_argument('--model', default='ldae_vit_tiny_patch4_32', help='timm model name (default: %(default)s)')
    f.add_argument('--pretrained', action='store_true', help='load the pretrained weights of the name or tag')
    f.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    f.add_argument('--t', type=int, default=10, help='fixed timestep of the encoder (default: %(default)s)')
    f.add_argument('--layers', type=int, nargs='+', help='0-based block indices (default: the last)')
    f.add_argument('--ts', type=int, nargs='+', help='timesteps to tap (default: --t)')
    f.add_argument('--noise', action='store_true', help="add the model's training noise at each t")
    f.add_argument('--seed', type=int, default=0, help='seed of the noise')
    f.add_argument('--out', help='save the features to this .safetensors file')
    f.set_defaults(func=cmd_features)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
