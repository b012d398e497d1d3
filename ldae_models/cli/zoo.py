"""The zoo's commands: ``list`` (models and tags), ``info`` (one model), ``convert`` (a checkpoint to safetensors),
``export`` (a merged encoder as a plain timm folder)."""
import argparse
import json
import os

import torch

from .common import json_object, load_cli_model, say


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('list', help='list models and pretrained tags', description="List the zoo's models and their "
                       'pretrained tags, marking the tags whose weights are on this machine.')
    p.add_argument('pattern', nargs='?', default='*', help='wildcard (default: all)')
    p.set_defaults(run=run_list)

    p = sub.add_parser('info', help='describe a model', description="Print a model's configuration, sizes and weight "
                       'source.')
    p.add_argument('name', help='model name, alias or NAME.TAG')
    p.set_defaults(run=run_info)

    p = sub.add_parser('convert', help='convert a checkpoint to safetensors', description='Read a checkpoint safely '
                       '(safetensors, or torch.load with weights_only) in any supported layout and write safetensors.')
    p.add_argument('src', help='input checkpoint (.safetensors, .pt, .pth, .bin, training checkpoint)')
    p.add_argument('dst', help='output .safetensors file')
    p.add_argument('--model', help="convert through this model's filter and check that every key fits it")
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')
    p.add_argument('--no-ema', action='store_true', help="take a training checkpoint's model weights, not its EMA")
    p.add_argument('--full', '--dae', action='store_true', help='the file holds the whole model (an l-DAE: decoder and '
                   'PCA tokenizer too): keep it all, checked by a strict load into the whole --model')
    p.add_argument('--dtype', choices=['float32', 'float16', 'bfloat16'],
                   help="store floating-point tensors in this type (loading casts back to the model's)")
    p.add_argument('--keep', nargs='*', metavar='GLOB', help='keys that keep their dtype under --dtype (default: '
                   '*tokenizer.* *pos_embed, the PCA statistics and the fixed sin-cos positions)')
    p.set_defaults(run=run_convert)

    p = sub.add_parser('export', help='export a merged encoder as a plain timm checkpoint',
                       description='Merge an encoder at a fixed t and save it as a folder (model.safetensors, '
                                   'config.json, README.md) that timm loads without ldae_models.')
    p.add_argument('name', help='NAME.TAG, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('dst', help='output folder')
    p.add_argument('--t', type=float, help="timestep folded into the weights (default: the encoder's own)")
    p.add_argument('--checkpoint', help='weights file to load into NAME first')
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')
    p.add_argument('--allow-random', action='store_true', help='export even when no weights are named')
    p.set_defaults(run=run_export)


def run_list(args: argparse.Namespace) -> int:
    import fnmatch
    import timm
    from ..hub.sources import weight_source
    from ..models import list_models
    models = [m for m in list_models() if fnmatch.fnmatch(m, args.pattern)]
    print(f'{len(models)} models matching {args.pattern!r}; pretrained tags marked [offline] have their bytes here')
    for m in models:
        print(m)
        for tag in sorted(timm.list_pretrained(m + '.*')):
            cfg = timm.models.get_pretrained_cfg(tag).to_dict()
            src = weight_source(cfg)
            mark = '[offline]' if src.available_offline() else '[download]'
            where = 'packaged' if cfg.get('file') else src.describe()
            print(f'    {tag:50s} {mark:10s} {where}  license={cfg.get("license")}')
    return 0


def run_info(args: argparse.Namespace) -> int:
    import timm
    from ..hub.sources import cfg_sha256, weight_source
    from ..models import full_model, pretrained_cfg_for
    cfg = pretrained_cfg_for(args.name)
    with torch.device('meta'):
        enc = timm.create_model(args.name.split('.')[0], merged=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(args.name)
    print(f'  class: {type(enc).__name__}; taps: {enc.num_taps}; fixed t: {enc.t:g}; schedule: {enc.schedule!r}'
          f'{"; noisy input" if enc.noisy_input else ""}')
    print(f'  parameters: {count(enc):,}' + (' (conditional)' if hasattr(enc, 'merge') else ''))
    if hasattr(enc, 'vit_args'):
        from timm.models import VisionTransformer
        with torch.device('meta'):
            print(f'  parameters: merged {count(VisionTransformer(**enc.vit_args())):,}')
    with torch.device('meta'):
        full = full_model(args.name.split('.')[0])
    if full is not enc and type(full) is not type(enc):
        print(f'  parameters: full {type(full).__name__} {count(full):,}')
    src = weight_source(cfg)
    print('  weights: ' + ('none' if src is None else f'{src.describe()} (offline: {src.available_offline()}, '
                                                     f'sha256: {cfg_sha256(cfg)})'))
    print('  pretrained cfg: ' + json.dumps(cfg, default=str, indent=2).replace('\n', '\n  '))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ..hub import read_checkpoint, unwrap_state_dict
    from ..hub.publish import FLOAT32_KEPT, cast_floats, save_safetensors
    say(f'reading {args.src}' + (f' into {args.model} (a strict load checks it)' if args.model else ''))
    if args.full:  # the whole model (an l-DAE's decoder and tokenizer too), checked by a strict load
        from ..models import full_model
        if not args.model:
            raise ValueError('--full needs --model (the architecture)')
        state = full_model(args.model, checkpoint=args.src, **json_object(args.model_args)).state_dict()
    elif args.model:  # through the model's own filter and strict load: the result is known to fit
        from ..models import load_model
        state = load_model(args.model, checkpoint=args.src, merged=False, **json_object(args.model_args)).state_dict()
    else:
        state = unwrap_state_dict(read_checkpoint(args.src), prefer_ema=not args.no_ema)
    if args.dtype:
        state = cast_floats(state, getattr(torch, args.dtype), FLOAT32_KEPT if args.keep is None else args.keep)
    say(f'writing {args.dst}')
    save_safetensors(state, args.dst, metadata={'architecture': args.model} if args.model else None)
    size = os.path.getsize(args.dst) / 2 ** 20
    print(f'wrote {args.dst}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values, {size:.1f} MiB')
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..hub.publish import export_timm
    from ..models import names_weights
    if not (args.checkpoint or names_weights(args.name) or args.allow_random):
        raise ValueError(f'{args.name} names no weights: give a tag (NAME.TAG), local-dir:/hf-hub:, --checkpoint FILE, '
                         f'or --allow-random to export random weights')
    model = argparse.Namespace(model=args.name, pretrained=None, checkpoint=args.checkpoint,
                               model_args=args.model_args)
    merged = load_cli_model(model, merged=True, **({} if args.t is None else {'t': args.t}))
    out = export_timm(merged, args.dst, source=args.name)
    print(f'wrote {out} (timm ViT merged at t={merged.t:g}); load it with timm alone: '
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0
