"""Command line: ``ldae-models`` (also ``python -m ldae_models``).

    ldae-models demo                          # the shipped CIFAR-10 model: features + denoising figure
    ldae-models features                      # features of sample images, default model
    ldae-models features --layers 5 11 --ts 0 10 80 --noise --out feats.safetensors
    ldae-models list                          # models and pretrained tags, offline availability
    ldae-models info ldae_vit_b               # config, sizes, weight source
    ldae-models convert train_ckpt.pth model.safetensors --model ldae_vit_tiny_patch4_32
    ldae-models export ldae_vit_tiny_patch4_32.cifar10 --t 10 out_dir/
"""
import argparse
import os
import sys
from typing import List, Optional

import torch

__all__ = ['main', 'DEFAULT_MODEL']

DEFAULT_MODEL = 'ldae_vit_tiny_patch4_32.cifar10'  # shipped inside the package: works offline


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
    if args.pretrained is None:  # a tagged name loads its weights unless told not to
        args.pretrained = _has_weights_name(args.model)
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
    if not args.pretrained:
        print('  note: untrained DiT-style blocks start as the identity (adaLN-Zero), so these features do not yet '
              'vary with the layer or t')
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


def cmd_denoise(args: argparse.Namespace) -> int:
    """The paper's Fig. 8: clean image, its latent-noised version (the network input), the denoised output."""
    import ldae_models
    from torchvision.utils import save_image
    if not args.checkpoint and not _has_weights_name(args.model):
        raise SystemExit(f'{args.model} names no weights: give a tag (e.g. {DEFAULT_MODEL}) or --checkpoint FILE')
    dae = ldae_models.create_dae(args.model, pretrained=not args.checkpoint, checkpoint=args.checkpoint,
                                 **_model_args(args)).eval()
    if not dae.tokenizer.fitted:
        raise SystemExit(f'{args.checkpoint or args.model} carries no fitted PCA tokenizer')
    enc = dae.encoder
    enc.pretrained_cfg = dict(input_size=(3, *enc.patch_embed.img_size), mean=(0.5,) * 3, std=(0.5,) * 3,
                              crop_pct=1.0, interpolation='bicubic')
    images = load_images(args.images or sample_image_paths(), enc)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        noisy, _ = dae.add_noise(images, args.t, generator=g)
        pred = dae.denoise(noisy, args.t)
    rows = torch.stack([images, noisy, pred], dim=1).flatten(0, 1)  # per image: clean, noisy, denoised
    zoom = max(1, 128 // rows.shape[-1])  # small images are shown enlarged, pixel for pixel
    rows = torch.nn.functional.interpolate(rows, scale_factor=zoom, mode='nearest')
    save_image((rows.clamp(-1, 1) + 1) / 2, args.out, nrow=3, padding=2, pad_value=1.0)
    mse = ((pred - images) ** 2).mean().item()
    print(f'wrote {args.out}: {len(images)} rows of clean / noisy (t={args.t}) / denoised; denoised MSE {mse:.4f}')
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job in one command: features of sample images and the denoising figure, offline."""
    out = args.out_dir
    os.makedirs(out, exist_ok=True)
    images = ['--images', *args.images] if args.images else []
    main(['features', '--model', args.model, '--layers', '5', '11', '--ts', '0', '10', '80',
          '--out', os.path.join(out, 'features.safetensors'), *images])
    main(['denoise', '--model', args.model, '--t', str(args.t), '--out', os.path.join(out, 'denoising.png'), *images])
    return 0


def _model_args(args: argparse.Namespace) -> dict:
    import json
    if not args.model_args:
        return {}
    try:
        value = json.loads(args.model_args)
    except json.JSONDecodeError as e:
        raise SystemExit(f'--model-args is not valid JSON: {e}')
    if not isinstance(value, dict):
        raise SystemExit('--model-args must be a JSON object, e.g. \'{"depth": 6}\'')
    return value


def _has_weights_name(name: str) -> bool:
    return name.startswith(('hf-hub:', 'local-dir:')) or '.' in name.split(':')[-1].split('/')[-1]


def cmd_list(args: argparse.Namespace) -> int:
    import timm
    import ldae_models  # noqa: F401
    from .pretrained import weights_available_offline
    models = timm.list_models(args.pattern)
    tags = set(timm.list_pretrained(args.pattern))
    print(f'{len(models)} models matching {args.pattern!r}; pretrained tags marked [offline] have their bytes here')
    for m in models:
        print(m)
        for tag in sorted(t for t in tags if t.split('.', 1)[0] == m):
            cfg = timm.models.get_pretrained_cfg(tag).to_dict()
            mark = '[offline]' if weights_available_offline(cfg) else '[download]'
            src = cfg.get('file') and 'packaged' or cfg.get('hf_hub_id') or cfg.get('url')
            print(f'    {tag:50s} {mark:10s} {src}  license={cfg.get("license")}')
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import json
    import timm
    import ldae_models  # noqa: F401
    from .pretrained import cfg_sha256, weights_available_offline
    try:
        with torch.device('meta'):
            enc = timm.create_model(args.name, merged=False)
    except RuntimeError as e:
        raise SystemExit(str(e))
    cfg = dict(enc.pretrained_cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f'{args.name}')
    print(f'  class: {type(enc).__name__}; blocks: {len(enc.blocks)}; width: {enc.embed_dim}; fixed t: {enc.t}')
    print(f'  parameters: conditional {count(enc):,}')
    if hasattr(enc, 'vit_args'):
        from timm.models import VisionTransformer
        with torch.device('meta'):
            print(f'  parameters: merged {count(VisionTransformer(**enc.vit_args())):,}')
    if args.name.split('.')[0] in ldae_models.list_daes():
        with torch.device('meta'):
            print(f'  parameters: full DAE {count(ldae_models.create_dae(args.name)):,}')
    has = bool(cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url'))
    print(f'  weights: {"yes" if has else "none"}' + (f' (offline: {weights_available_offline(cfg)}, '
                                                      f'sha256: {cfg_sha256(cfg)})' if has else ''))
    shown = {k: v for k, v in cfg.items() if k not in ('state_dict',)}
    print('  pretrained cfg: ' + json.dumps(shown, default=str, indent=2).replace('\n', '\n  '))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file
    from .pretrained import read_checkpoint, unwrap_state_dict
    if args.dae:  # the whole l-DAE, checked by a strict load into create_dae
        import ldae_models
        if not args.model:
            raise SystemExit('--dae needs --model (the l-DAE size)')
        state = ldae_models.create_dae(args.model, checkpoint=args.src, **_model_args(args)).state_dict()
    elif args.model:  # through the model's own filter and strict load: the result is known to fit
        import timm
        import ldae_models  # noqa: F401
        model = timm.create_model(args.model, pretrained=True, merged=False,
                                  pretrained_cfg_overlay=dict(file=args.src), **_model_args(args))
        state = model.state_dict()
    else:
        state = unwrap_state_dict(read_checkpoint(args.src), prefer_ema=args.ema)
    if args.dtype:
        from fnmatch import fnmatchcase
        dtype = getattr(torch, args.dtype)
        keep = args.keep if args.keep is not None else ['*tokenizer.*', '*pos_embed']
        state = {k: v.to(dtype) if v.is_floating_point() and not any(fnmatchcase(k, p) for p in keep) else v
                 for k, v in state.items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, args.dst,
              metadata={'format': 'pt', **({'architecture': args.model} if args.model else {})})
    size = os.path.getsize(args.dst) / 2 ** 20
    print(f'wrote {args.dst}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values, {size:.1f} MiB')
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import timm
    import ldae_models  # noqa: F401
    from .pretrained import export_timm
    kw = {}
    if args.checkpoint:
        kw['pretrained_cfg_overlay'] = dict(file=args.checkpoint)
    pretrained = bool(args.checkpoint) or _has_weights_name(args.name)
    if not pretrained and not args.allow_random:
        raise SystemExit(f'{args.name} names no weights: give a tag (NAME.TAG), local-dir:/hf-hub:, --checkpoint FILE, '
                         f'or --allow-random to export random weights')
    merged = timm.create_model(args.name, pretrained=pretrained, merged=True, t=args.t, **kw, **_model_args(args))
    out = export_timm(merged, args.dst, source=args.name)
    print(f'wrote {out} (timm architecture {merged.pretrained_cfg.get("architecture", "vit")} merged at t={args.t}); '
          f"load it with timm alone: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='ldae-models', description='Denoising-based self-supervised encoders for timm.')
    sub = ap.add_subparsers(dest='command', required=True)
    sub.add_parser('train', help='train a model (see ldae-models train --help)', add_help=False)
    sub.add_parser('probe', help='linear-probe an encoder (see ldae-models probe --help)', add_help=False)
    f = sub.add_parser('features', help='extract pooled features of images',
                       description='Extract pooled encoder features of images (default: sample photos '
                                   'shipped with matplotlib) and print or save them.')
    f.add_argument('--model', default=DEFAULT_MODEL, help='timm model name or NAME.TAG (default: %(default)s, '
                   'shipped inside the package)')
    f.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                   help='load the weights of the name or tag (default: when the name carries a tag)')
    f.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    f.add_argument('--t', type=int, default=10, help='fixed timestep of the encoder (default: %(default)s)')
    f.add_argument('--layers', type=int, nargs='+', help='0-based block indices (default: the last)')
    f.add_argument('--ts', type=int, nargs='+', help='timesteps to tap (default: --t)')
    f.add_argument('--noise', action='store_true', help="add the model's training noise at each t")
    f.add_argument('--seed', type=int, default=0, help='seed of the noise')
    f.add_argument('--out', help='save the features to this .safetensors file')
    f.set_defaults(func=cmd_features)

    p = sub.add_parser('denoise', help='denoising figure of a trained l-DAE', description='Write the paper\'s '
                       'Fig. 8 for a trained DAE: clean / latent-noised / denoised, one row per image.')
    p.add_argument('--checkpoint', help='full-DAE weights (OUT/model.safetensors of ldae-models train); default: '
                   'those of the --model tag')
    p.add_argument('--model', default=DEFAULT_MODEL, help='l-DAE size or NAME.TAG (default: %(default)s)')
    p.add_argument('--model-args', help='JSON object of model keyword arguments')
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=int, default=500, help='noise level as a timestep (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='denoising.png', help='output PNG (default: %(default)s)')
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser('demo', help='the shipped model at work: features and a denoising figure',
                       description='Load the l-DAE shipped inside the package (offline), extract pooled features '
                                   'of sample photos (matplotlib\'s, or --images) at blocks 5 and 11 and t = 0, 10, '
                                   '80, save them, and write the denoising figure (clean / noised / denoised).')
    p.add_argument('--model', default=DEFAULT_MODEL, help='l-DAE NAME.TAG with full-DAE weights (default: %(default)s)')
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=int, default=500, help='noise level of the figure (default: %(default)s)')
    p.add_argument('--out-dir', default='.', help='where features.safetensors and denoising.png go (default: .)')
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser('list', help='list models and pretrained tags', description='List registered models and '
                       'their pretrained tags, marking the tags whose weights are on this machine.')
    p.add_argument('pattern', nargs='?', default='ldae*', help='timm wildcard (default: %(default)s)')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('info', help='describe a model', description='Print a model\'s configuration, sizes and '
                       'weight source.')
    p.add_argument('name', help='model name, alias or NAME.TAG')
    p.set_defaults(func=cmd_info)

    p = sub.add_parser('convert', help='convert a checkpoint to safetensors', description='Read a checkpoint safely '
                       '(safetensors, or torch.load with weights_only) in any supported layout and write safetensors.')
    p.add_argument('src', help='input checkpoint (.safetensors, .pt, .pth, .bin, training checkpoint)')
    p.add_argument('dst', help='output .safetensors file')
    p.add_argument('--model', help="convert through this model's filter and check that every key fits it")
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')
    p.add_argument('--ema', action='store_true', help='prefer the EMA weights of a training checkpoint')
    p.add_argument('--dae', action='store_true', help='the file holds the whole l-DAE (decoder and PCA tokenizer '
                   'too): keep it all, checked by a strict load into create_dae(--model)')
    p.add_argument('--dtype', choices=['float32', 'float16', 'bfloat16'],
                   help='store floating-point tensors in this type (loading casts back to the model\'s)')
    p.add_argument('--keep', nargs='*', metavar='GLOB', help='keys that keep their dtype under --dtype '
                   '(default: *tokenizer.* *pos_embed, the PCA statistics and the fixed sin-cos positions)')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser('export', help='export a merged encoder as a plain timm checkpoint',
                       description='Merge an encoder at a fixed t and save it as a folder (model.safetensors, '
                                   'config.json, README.md) that timm loads without ldae_models.')
    p.add_argument('name', help='NAME.TAG, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('dst', help='output folder')
    p.add_argument('--t', type=int, default=10, help='timestep folded into the weights (default: %(default)s)')
    p.add_argument('--checkpoint', help='weights file to load into NAME first')
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')
    p.add_argument('--allow-random', action='store_true', help='export even when no weights are named')
    p.set_defaults(func=cmd_export)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ('train', 'probe'):  # their own parsers (also python -m ldae_models.train)
        if argv[0] == 'train':
            from .train import main as train_main
            return train_main(argv[1:])
        from .probe import probe_main
        return probe_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
