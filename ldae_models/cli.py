"""The command line: ``ldae-models COMMAND`` (also ``python -m ldae_models``), the one argparse front end.

    ldae-models demo                          # the shipped CIFAR-10 model: features + denoising figure
    ldae-models features --layers 5 11 --ts 0 10 80 --noisy-input --out feats.safetensors
    ldae-models train --dataset cifar10 --data-root ~/data --out runs/tiny --epochs 400
    ldae-models extract --model NAME.TAG --dataset cifar10 --data-root ~/data --out feats/   # shards, any (layers, t)
    ldae-models probe --model NAME.TAG --dataset cifar10 --data-root ~/data --floors         # linear + kNN
    ldae-models list | info NAME | convert SRC DST | export NAME DST

A mistake (a missing file, an unknown model, a bad argument) is answered with one line naming it and exit status 2;
``--debug`` (or ``LDAE_MODELS_DEBUG=1``) shows the traceback instead.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ['main', 'build_parser', 'DEFAULT_MODEL']

DEFAULT_MODEL = 'ldae_vit_tiny_patch4_32.cifar10'  # shipped inside the package: works offline
_USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)  # ImportError: those that say what to install


# -- shared helpers --------------------------------------------------------------------------------------------------

def _json_object(text: Optional[str], flag: str = '--model-args') -> Dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f'{flag} is not valid JSON: {e}') from None
    if not isinstance(value, dict):
        raise ValueError(f'{flag} must be a JSON object, e.g. \'{{"depth": 6}}\'')
    return value


def _at_least(low: float, kind: type = int):
    """An argparse type: a number of ``kind`` that is >= ``low`` (the error names the bound and the value)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"an integer" if kind is int else "a number"}') from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f'must be >= {low:g}, got {text}')
        return value
    return parse


def _stage(message: str) -> None:
    """A line per stage of a long command (stderr, so that stdout stays the result)."""
    print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def _device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is available')
    return torch.device(name)


def _model(args: argparse.Namespace, **kwargs: Any) -> torch.nn.Module:
    """The model a command names: its encoder (timm's entrypoint), or with ``--full`` the whole model."""
    from .models import full_model, load_model, names_weights
    checkpoint, model_args = getattr(args, 'checkpoint', None), _json_object(getattr(args, 'model_args', None))
    pretrained = getattr(args, 'pretrained', None)
    if getattr(args, 'full', False):
        kwargs.pop('merged', None)
        pretrained = names_weights(args.model) if pretrained is None else pretrained
        return full_model(args.model, pretrained=pretrained and not checkpoint, checkpoint=checkpoint,
                          **model_args, **kwargs).eval()
    return load_model(args.model, pretrained=pretrained, checkpoint=checkpoint, **model_args, **kwargs).eval()


def _add_model_args(p: argparse.ArgumentParser, default: Optional[str] = DEFAULT_MODEL) -> None:
    p.add_argument('--model', default=default, required=default is None,
                   help='timm name, NAME.TAG, local-dir:PATH or hf-hub:ORG/NAME' +
                        (' (default: %(default)s, shipped inside the package)' if default else ''))
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                   help='load the weights the name names (default: when it carries a tag, or is hf-hub:/local-dir:)')
    p.add_argument('--checkpoint', help='your own weights file for the architecture (any layout it reads)')
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    from .data import DATASETS
    p.add_argument('--dataset', choices=DATASETS, default='folder',
                   help="folder: an ImageFolder (ROOT/train, ROOT/test or val); cifar10: torchvision's CIFAR-10 "
                        "folder; npz: arrays (default: %(default)s)")
    p.add_argument('--data-root', '--data-dir', dest='data_root', required=required,
                   help='the data set: ImageFolder root, the folder torchvision.datasets.CIFAR10(root) uses, or .npz')
    p.add_argument('--download', action='store_true', help='download CIFAR-10 where the network allows')
    p.add_argument('--workers', type=_at_least(-1), default=-1,
                   help='DataLoader workers streaming the images (-1: from the core count; 0: in this process)')


# -- features, denoise, demo -----------------------------------------------------------------------------------------

def sample_image_paths() -> List[str]:
    """Photos that ship with matplotlib (the ``demo`` extra), used when no --images are given."""
    try:
        from matplotlib import cbook
    except ImportError:
        raise ImportError('no --images given and matplotlib (for its sample images) is not installed: '
                          'pip install "ldae-models[demo]" or pass --images FILE ...') from None
    names = ('grace_hopper.jpg', 'Minduka_Present_Blue_Pack.png', 'logo2.png')
    return [str(cbook.get_sample_data(n, asfileobj=False)) for n in names]


def load_images(paths: List[str], cfg: Dict[str, Any]) -> torch.Tensor:
    """Read images with PIL and apply the eval transform of a pretrained cfg (resize, center crop, normalise)."""
    from PIL import Image, UnidentifiedImageError
    import timm.data
    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg), is_training=False)
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f'image not found: {p}')
        try:
            with Image.open(p) as im:
                out.append(transform(im.convert('RGB')))
        except UnidentifiedImageError:
            raise ValueError(f'not an image file: {p}') from None
    return torch.stack(out)


def cmd_features(args: argparse.Namespace) -> int:
    from .features import extract_features, feature_key
    from .hub.publish import save_safetensors
    model = _model(args, merged=False, **({} if args.t is None else {'t': args.t}))
    tokenizer = getattr(model, 'tokenizer', None)
    if args.noisy_input and tokenizer is not None and not tokenizer.fitted:
        raise ValueError(f'--noisy-input needs the fitted PCA tokenizer that a trained checkpoint carries; '
                         f'{args.model} has random weights here (give a tag, e.g. {DEFAULT_MODEL})')
    paths = args.images or sample_image_paths()
    channels = model.pretrained_cfg['input_size'][0]
    if channels != 3:
        hint = model._channel_hint() if hasattr(model, '_channel_hint') else ''
        raise ValueError(f'{args.model} takes {channels}-channel inputs, not RGB images{hint}'.replace(
            'create the model with vae=', "pass --model-args '{\"vae\": ...}' with vae="))
    images = load_images(paths, model.pretrained_cfg)
    has = bool(model.pretrained_cfg.get('tag') or args.checkpoint or args.model.startswith(('hf-hub:', 'local-dir:')))
    print(f'{args.model}: {"pretrained weights" if has else "random weights (untrained: give a tag for trained ones)"}; '
          f'{len(paths)} images {tuple(images.shape[1:])}')
    if not has:
        print('  note: untrained DiT-style blocks start as the identity (adaLN-Zero), so these features do not yet '
              'vary with the layer or t')
    feats = extract_features(model, images, layers=args.layers or [-1], ts=args.ts, noisy_input=args.noisy_input,
                             generator=torch.Generator().manual_seed(args.seed))
    tensors = {}
    for (layer, t), f in feats.items():
        print(f'  layer {layer:>3} t {t:>6g}: features {tuple(f.shape)}  mean {f.mean():+.4f}  std {f.std():.4f}  '
              f'first {[round(v, 4) for v in f[0, :4].tolist()]}')
        tensors[feature_key(layer, t)] = f.contiguous()
    if args.out:
        save_safetensors(tensors, args.out, metadata={'model': args.model, 'images': '\n'.join(paths)})
        print(f'wrote {args.out}')
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    """The paper's Fig. 8: clean image, its latent-noised version (the network input), the denoised output."""
    from .models import full_model, names_weights
    if not args.checkpoint and not names_weights(args.model):
        raise ValueError(f'{args.model} names no weights: give a tag (e.g. {DEFAULT_MODEL}) or --checkpoint FILE')
    dae = full_model(args.model, pretrained=not args.checkpoint, checkpoint=args.checkpoint,
                     **_json_object(args.model_args)).eval()
    if not hasattr(dae, 'tokenizer'):
        raise ValueError(f'{args.model} is not an l-DAE: denoise draws the l-DAE figure')
    if not dae.tokenizer.fitted:
        raise ValueError(f'{args.checkpoint or args.model} carries no fitted PCA tokenizer')
    size = tuple(dae.encoder.patch_embed.img_size)
    images = load_images(args.images or sample_image_paths(), dict(input_size=(3, *size), mean=(0.5,) * 3,
                                                                   std=(0.5,) * 3, crop_pct=1.0, interpolation='bicubic'))
    with torch.no_grad():
        noisy, _ = dae.add_noise(images, args.t, generator=torch.Generator().manual_seed(args.seed))
        pred = dae.denoise(noisy, args.t)
    from .plots import denoising_figure
    rows = denoising_figure(images, noisy, pred, args.t, args.out)
    for i, r in enumerate(rows):
        print(f'  image {i}: MSE noised {r["mse_noisy"]:.4f} -> denoised {r["mse_denoised"]:.4f}')
    print(f'wrote {args.out}: {len(images)} rows of clean / noised (t={args.t:g}) / denoised')
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job in one command: features of sample images and the denoising figure, offline. Both files appear
    only when both are made (they are written in a temporary folder first)."""
    import shutil
    import tempfile
    os.makedirs(args.out_dir, exist_ok=True)
    images = ['--images', *args.images] if args.images else []
    names = ('features.safetensors', 'denoising.png')
    import contextlib
    import io
    with tempfile.TemporaryDirectory(dir=args.out_dir, prefix='.demo-') as tmp:
        said = io.StringIO()  # the two commands' output, told with the files' final names
        with contextlib.redirect_stdout(said):
            code = main(['denoise', '--model', args.model, '--t', str(args.t), '--out', os.path.join(tmp, names[1]),
                         *images])  # first: it checks t against the model
            code = code or main(['features', '--model', args.model, '--layers', '5', '11', '--ts', '0', '10', '80',
                                 '--out', os.path.join(tmp, names[0]), *images])
        print(said.getvalue().replace(tmp, args.out_dir), end='')
        if code == 0:
            for name in names:
                shutil.move(os.path.join(tmp, name), os.path.join(args.out_dir, name))
    return code


# -- the zoo ------------------------------------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace) -> int:
    import fnmatch
    import timm
    from .hub.sources import weight_source
    from .models import list_models
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


def cmd_info(args: argparse.Namespace) -> int:
    import timm
    from .hub.sources import cfg_sha256, weight_source
    from .models import full_model, pretrained_cfg_for
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


def cmd_convert(args: argparse.Namespace) -> int:
    from .hub.checkpoint import read_checkpoint, unwrap_state_dict
    from .hub.publish import FLOAT32_KEPT, cast_floats, save_safetensors
    _stage(f'reading {args.src}' + (f' into {args.model} (a strict load checks it)' if args.model else ''))
    if args.full:  # the whole model (an l-DAE's decoder and tokenizer too), checked by a strict load
        from .models import full_model
        if not args.model:
            raise ValueError('--full needs --model (the architecture)')
        state = full_model(args.model, checkpoint=args.src, **_json_object(args.model_args)).state_dict()
    elif args.model:  # through the model's own filter and strict load: the result is known to fit
        from .models import load_model
        state = load_model(args.model, checkpoint=args.src, merged=False, **_json_object(args.model_args)).state_dict()
    else:
        state = unwrap_state_dict(read_checkpoint(args.src), prefer_ema=not args.no_ema)
    if args.dtype:
        state = cast_floats(state, getattr(torch, args.dtype), FLOAT32_KEPT if args.keep is None else args.keep)
    _stage(f'writing {args.dst}')
    save_safetensors(state, args.dst, metadata={'architecture': args.model} if args.model else None)
    size = os.path.getsize(args.dst) / 2 ** 20
    print(f'wrote {args.dst}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values, {size:.1f} MiB')
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .hub.publish import export_timm
    from .models import names_weights
    if not (args.checkpoint or names_weights(args.name) or args.allow_random):
        raise ValueError(f'{args.name} names no weights: give a tag (NAME.TAG), local-dir:/hf-hub:, --checkpoint FILE, '
                         f'or --allow-random to export random weights')
    args.model, args.pretrained = args.name, None
    merged = _model(args, merged=True, **({} if args.t is None else {'t': args.t}))
    out = export_timm(merged, args.dst, source=args.name)
    print(f'wrote {out} (timm ViT merged at t={merged.t:g}); load it with timm alone: '
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


# -- train ----------------------------------------------------------------------------------------------------------------

def _add_config_args(p: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per field of a config dataclass, its help the field's reason."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = '--' + f.name.replace('_', '-')
        meta = dict(f.metadata)
        if meta.get('cli') is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        base = typing.get_origin(kind) or kind
        helptext = meta.get('help', '') + (f' (default: {default})' if default not in (None, '', False) else '')
        # every flag defaults to None (a switch to False): the flags given are known, and a recipe keeps the rest
        if f.name == 'data_root':
            p.add_argument(flag, '--data-dir', dest=f.name, default=None, help=helptext)
        elif base is bool:
            p.add_argument(flag, action='store_true', help=meta.get('help', ''))
        elif base is dict:
            p.add_argument(flag, type=lambda s, n=flag: _json_object(s, n), default=None, help=helptext)
        elif base in (list, tuple):
            p.add_argument(flag, type=typing.get_args(kind)[0], nargs='+', default=None, help=helptext)
        else:
            p.add_argument(flag, type=base, default=None, choices=meta.get('choices'), help=helptext)


def _given(config_cls: type, args: argparse.Namespace) -> Dict[str, Any]:
    """The fields of ``config_cls`` that the command line set (a switch: when on)."""
    given = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(config_cls)
             if f.metadata.get('cli') is not False}
    return {k: v for k, v in given.items() if v is not None and v is not False}  # not `in`: 0 == False


def _config(config_cls: type, args: argparse.Namespace) -> Any:
    """The config dataclass the flags of ``_add_config_args`` describe: the flags given, the fields' defaults."""
    return config_cls(**_given(config_cls, args))


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train
    given = _given(TrainConfig, args)
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if args.recipe:
        from .recipes import train_config
        cfg, sources = train_config(args.recipe, gpu_mem_gb=args.gpu_mem_gb, world=world,
                                    micro_batch=args.micro_batch, **given)
        cfg.sources = sources
    else:
        cfg = TrainConfig(**given)
        if args.micro_batch:  # the global batch kept, accumulated over micro-batches of this size
            if cfg.batch_size % (world * args.micro_batch):
                raise ValueError(f'--micro-batch {args.micro_batch} does not divide the per-GPU batch of '
                                 f'--batch-size {cfg.batch_size} over {world} processes')
            cfg.accum_steps = cfg.batch_size // (world * args.micro_batch)
    result = train(cfg)
    if result.get('weights'):
        _stage(f'done: {result["step"]} steps; weights {result["weights"]}')
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill
    if args.recipe:
        from .recipes import distill_config
        cfg, sources = distill_config(args.recipe, **_given(DistillConfig, args))
        cfg.sources = sources
    else:
        cfg = _config(DistillConfig, args)
    result = distill(cfg)
    if result.get('student'):
        _stage(f'done: the student is {result["student"]} (timm.create_model(\'local-dir:{result["student"]}\', '
               f'pretrained=True))')
    return 0


# -- extract and probe ------------------------------------------------------------------------------------------------

def _split(args: argparse.Namespace, split: str):
    """One split of the data set, listed, not decoded (its ``--max-train`` / ``--max-test`` subset): extraction,
    floors and MAE's probe stream it, so host memory stays flat in its size."""
    from .data import open_split
    if not args.data_root:
        raise ValueError('--data-root is required (the data set to probe on)')
    limit = getattr(args, 'max_train' if split == 'train' else 'max_test', 0)
    return open_split(args.dataset, args.data_root, split, download=args.download, limit=limit,
                      seed=getattr(args, 'seed', 0) + (split == 'test'))


def _feature_meta(args: argparse.Namespace, model: torch.nn.Module) -> Dict[str, Any]:
    return dict(model=args.model, checkpoint=args.checkpoint, model_args=_json_object(args.model_args),
                full=args.full, noisy_input=args.noisy_input, seed=args.seed, dataset=args.dataset, max_train=args.max_train,
                max_test=args.max_test, t_default=getattr(model, 't', None))


def _split_features(args: argparse.Namespace, model: torch.nn.Module, cells: List[Any], device: torch.device,
                    split: str, folder: Optional[str], shard_size: int = 50_000, keep: bool = True):
    """(features, labels, extraction seconds) of one split at the (layer, t) ``cells`` (``features.feature_cells``):
    the cells ``folder/split`` holds are read, the others extracted and added to it."""
    from .features import cached_features, dataset_features
    seconds = [0.0]

    def extract(layers: List[int], ts: List[Any], sink, keep: bool):
        data = _split(args, split)
        _stage(f'extracting features of {len(data):,} {split} images at blocks {layers}, t {ts} on {device}')
        t0 = time.time()
        feats = dataset_features(model, data, layers=layers, ts=ts, noisy_input=args.noisy_input,
                                 batch_size=args.batch_size_features, device=device, seed=args.seed + (split == 'test'),
                                 desc=f'{split} features', sink=sink, keep=keep, workers=args.workers)
        seconds[0] = time.time() - t0
        return feats, data.labels

    feats, labels = cached_features(folder and Path(folder) / split, dict(_feature_meta(args, model), split=split),
                                    cells, extract, log=_stage, shard_size=shard_size, keep=keep)
    return feats, labels, seconds[0]


def _features_for(args: argparse.Namespace, model: torch.nn.Module, cells: List[Any], device: torch.device,
                  cache: Optional[str] = None):
    """Both splits' ``_split_features``: (train features, labels, test features, labels, extraction seconds)."""
    ftr, ytr, s_tr = _split_features(args, model, cells, device, 'train', cache)
    fte, yte, s_te = _split_features(args, model, cells, device, 'test', cache)
    return ftr, ytr, fte, yte, s_tr + s_te


def cmd_extract(args: argparse.Namespace) -> int:
    from .data import split_exists
    from .features import feature_cells
    device = _device(args.device)
    model = _model(args, merged=False).to(device)
    cells = feature_cells(model, args.layers or [-1], args.ts)  # checked before any data is read
    for split in args.splits:  # every split is there before anything is written
        if not split_exists(args.dataset, args.data_root, split):
            raise ValueError(f'{args.data_root} has no {split} split (an ImageFolder needs ROOT/{split}'
                             f'{"/ or ROOT/val" if split == "test" else "/"}); choose --splits')
    for split in args.splits:
        _, labels, _ = _split_features(args, model, cells, device, split, args.out, args.shard_size, keep=False)
        print(f'{Path(args.out) / split}: {len(labels):,} images x {len(cells)} (block, t) cells')
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .plots import plot_grid
    from .probe import grid_to_json, mae_linear_probe, probe_features, write_json
    device = _device(args.device)
    model = _model(args, merged=False, **({} if args.t is None else {'t': args.t})).to(device)
    from .features import feature_cells
    # the cells, checked against the model before any data is read
    layers = args.layers or ([-1] if args.mode != 'grid' else list(range(model.num_taps)))
    cells = feature_cells(model, layers[:1] if args.mode == 'mae' else layers, [args.t] if args.mode == 'mae' else args.ts)
    result: Dict[str, Any] = dict(model=args.model, checkpoint=args.checkpoint, mode=args.mode, dataset=args.dataset,
                                  noisy_input=args.noisy_input, device=str(device))
    if args.mode == 'mae':
        from .engine import process_group
        train, test = _split(args, 'train'), _split(args, 'test')
        with process_group(args.device) as (rank, world, device):  # torchrun: every process takes its share
            model = model.to(device)
            _stage(f"MAE's linear probe: {args.epochs} epochs, batch {args.batch_size}, {world} process(es)")
            r = mae_linear_probe(model, train, test, layer=cells[0][0], t=args.t, noisy_input=args.noisy_input,
                                 epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                                 micro_batch=args.micro_batch, blr=args.blr, device=device, seed=args.seed,
                                 progress=True, rank=rank, world=world, workers=args.workers)
        if rank != 0:
            return 0
        result.update(r, n_train=len(train), n_test=len(test))
        print(f"{args.model} (mae): top-1 {r['top1']:.2f}%")
    else:
        ftr, ytr, fte, yte, extract_s = _features_for(args, model, cells, device, cache=args.features)
        result.update(n_train=len(ytr), n_test=len(yte), extract_s=round(extract_s, 3))
        pk = dict(solver=args.solver, weight_decay=args.weight_decay, epochs=args.epochs, lr=args.lr, device=device,
                  seed=args.seed)
        _stage(f'probing {len(ftr)} (block, t) cells ({args.solver})')
        rows = probe_features(ftr, ytr, fte, yte, knn=args.knn, check_lbfgs=args.check_lbfgs, **pk)
        result['grid'] = grid_to_json(rows)
        best_key = max(rows, key=lambda k: rows[k]['top1'])
        result.update(top1=rows[best_key]['top1'], best_layer=best_key[0], best_t=best_key[1])
        for (layer, t), r in rows.items():
            print(f'{args.model}: block {layer} t {t:g}: linear top-1 {r["top1"]:.2f}%' +
                  (f', kNN {r["knn_top1"]:.2f}%' if 'knn_top1' in r else '') +
                  (f' (L-BFGS {r["lbfgs_top1"]:.2f}%)' if 'lbfgs_top1' in r else ''))
        if args.floors:
            result['floors'] = _floors(args, model, device, pk, cells[-1][0])
        if args.mode == 'grid' and args.plot:
            plot_grid({k: v['top1'] for k, v in rows.items()}, args.plot, title=f'{args.model}: linear probe top-1 (%)')
            print(f'wrote {args.plot}')
    if args.out:
        write_json(args.out, result)
        print(f'wrote {args.out}')
    return 0


def _floors(args: argparse.Namespace, model: torch.nn.Module, device: torch.device, pk: Dict[str, Any],
            layer: int) -> Dict[str, Any]:
    """The floors of the same run (``probe.floors``) on the splits the model was probed on."""
    from .probe import floors
    result = floors(model, _split(args, 'train'), _split(args, 'test'), layer=layer, knn=args.knn,
                    batch_size=args.batch_size_features, progress=True, log=_stage, workers=args.workers, **pk)
    for name, r in result.items():
        print(f'floor {name}: linear top-1 {r["top1"]:.2f}%' + (f', kNN {r["knn_top1"]:.2f}%' if 'knn_top1' in r else ''))
    return result


# -- the parser ---------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, whose refusal of a flag is one line (and where to look), not the whole usage."""

    def error(self, message: str) -> 'typing.NoReturn':
        self.exit(2, f'{self.prog}: error: {message}\n({self.prog} --help lists the flags)\n')


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog='ldae-models', description='Denoising-based self-supervised encoders for timm.')
    ap.add_argument('--debug', action='store_true', help='show the traceback of an error')
    sub = ap.add_subparsers(dest='command', required=True)

    p = sub.add_parser('features', help='extract pooled features of images',
                       description='Extract pooled encoder features of images (default: sample photos shipped with '
                                   'matplotlib) at chosen layers and timesteps, print and save them.')
    _add_model_args(p)
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=float, help="the encoder's fixed t (default: the one it was trained for)")
    p.add_argument('--layers', type=int, nargs='+', help='0-based block indices (default: the last)')
    p.add_argument('--ts', type=float, nargs='+', help='timesteps to tap (default: the fixed t)')
    p.add_argument('--noisy-input', action='store_true', help="add the model's training noise at each t first")
    p.add_argument('--seed', type=int, default=0, help='seed of the noise')
    p.add_argument('--out', help='save the features to this .safetensors file')
    p.set_defaults(func=cmd_features)

    p = sub.add_parser('denoise', help='denoising figure of a trained l-DAE', description="Write the paper's Fig. 8 "
                       'for a trained DAE: clean / latent-noised / denoised, one row per image, with MSEs.')
    p.add_argument('--model', default=DEFAULT_MODEL, help='l-DAE size or NAME.TAG (default: %(default)s)')
    p.add_argument('--checkpoint', help='full-DAE weights (OUT/model.safetensors of ldae-models train)')
    p.add_argument('--model-args', help='JSON object of model keyword arguments')
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=float, default=500, help='noise level as a timestep (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='denoising.png', help='output PNG (default: %(default)s)')
    p.set_defaults(func=cmd_denoise)

    p = sub.add_parser('demo', help='the shipped model at work: features and a denoising figure',
                       description='Load the l-DAE shipped inside the package (offline), extract pooled features of '
                                   "sample photos (matplotlib's, or --images) at blocks 5 and 11 and t = 0, 10, 80, "
                                   'save them, and write the denoising figure (clean / noised / denoised).')
    p.add_argument('--model', default=DEFAULT_MODEL, help='l-DAE NAME.TAG with full-DAE weights (default: %(default)s)')
    p.add_argument('--images', nargs='+', help='image files (default: matplotlib sample images)')
    p.add_argument('--t', type=float, default=500, help='noise level of the figure (default: %(default)s)')
    p.add_argument('--out-dir', default='.', help='where features.safetensors and denoising.png go (default: .)')
    p.set_defaults(func=cmd_demo)

    from .train import TrainConfig
    p = sub.add_parser('train', help='train an l-DAE (or a DDAE UNet)', description='Train with a TrainConfig (each '
                       'flag is a field; torchrun runs it on many GPUs). See ldae_models/train.py.')
    from .recipes import RECIPES
    p.add_argument('--recipe', choices=list(RECIPES), help='a recipe of ldae_models/recipes.py (the paper\'s runs, '
                   'every value with its source); the other flags override it')
    p.add_argument('--gpu-mem-gb', type=_at_least(1, float), default=80.0,
                   help="with --recipe: each GPU's memory, for the micro-batch (default: %(default)s)")
    p.add_argument('--micro-batch', type=_at_least(1), default=0,
                   help='images per GPU per forward pass; the global batch is accumulated (default: planned by '
                        '--recipe, else --batch-size / processes)')
    _add_config_args(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    from .distill import DistillConfig
    p = sub.add_parser('distill', help="RepFusion: distil a diffusion teacher's features into a timm student",
                       description='Distil a teacher of the zoo at (layer, t) into any timm student, t chosen by a '
                                   'fixed, random or learned (REINFORCE) policy, then fine-tune the student on the '
                                   'labels. Each flag is a field of DistillConfig (ldae_models/distill.py).')
    from .recipes import DISTILL_RECIPES
    p.add_argument('--recipe', choices=list(DISTILL_RECIPES), help="a recipe of ldae_models/recipes.py "
                   "(repfusion_cifar10: the official CIFAR-10 run); flags override its values")
    _add_config_args(p, DistillConfig)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser('extract', help="write a data set's features to safetensors shards",
                       description='Extract pooled features of every image of a data set at chosen (layers, t) and '
                                   'write them as safetensors shards with an index (probe --features reads them).')
    _add_model_args(p, default=None)
    _add_data_args(p)
    p.add_argument('--splits', nargs='+', default=['train', 'test'], choices=['train', 'test'])
    p.add_argument('--full', action='store_true', help='the whole model (an l-DAE\'s decoder blocks too)')
    p.add_argument('--layers', type=int, nargs='+', help='0-based layers (default: the last)')
    p.add_argument('--ts', type=float, nargs='+', help='timesteps (default: the model\'s t)')
    p.add_argument('--noisy-input', action='store_true', help="noise the input at each t (default: the model's)")
    p.add_argument('--max-train', type=_at_least(0), default=0, help='a seeded subset of the train split (0: all)')
    p.add_argument('--max-test', type=_at_least(0), default=0)
    p.add_argument('--batch-size-features', type=_at_least(1), default=512, help='images per forward pass')
    p.add_argument('--shard-size', type=_at_least(1), default=50_000, help='rows per shard file')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--seed', type=int, default=0, help='seed of the subsets and the noise')
    p.add_argument('--out', required=True, help='output folder (OUT/train, OUT/test)')
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser('probe', help='linear-probe an encoder', description='Linear probe (and kNN) of an encoder on '
                       'a data set. fast (default): features once, the convex problem solved by L-BFGS; grid: every '
                       "(layer, t); mae: MAE's protocol (augmented, LARS, 90 epochs). --floors adds a random network of "
                       'the same shape and the raw pixels, measured in the same run.')
    _add_model_args(p, default=None)
    _add_data_args(p, required=False)
    p.add_argument('--mode', choices=('fast', 'grid', 'mae'), default='fast')
    p.add_argument('--full', action='store_true', help='probe the whole model (an l-DAE\'s decoder blocks too: layer '
                   'E + k is decoder block k); --checkpoint is then a whole-model file')
    p.add_argument('--features', help='feature folder (ldae-models extract): read when it holds these features, '
                                      'written otherwise')
    p.add_argument('--t', type=float, help="the encoder's t (default: the one it was trained for)")
    p.add_argument('--layers', type=int, nargs='+', help='layers (default: fast/mae the last, grid all)')
    p.add_argument('--ts', type=float, nargs='+', help='timesteps (default: the model\'s t)')
    p.add_argument('--noisy-input', action='store_true', help="noise the input at t (the paper's \"noisy input\")")
    p.add_argument('--solver', choices=('lbfgs', 'adam'), default='lbfgs', help='fast/grid (default: %(default)s)')
    p.add_argument('--weight-decay', type=_at_least(0, float), default=0.0,
                   help="L2 penalty of the probe (default: none, as MAE's probe and probe.linear_probe; a small penalty "
                        'such as 1e-4 makes the optimum unique where the train features are separable)')
    p.add_argument('--check-lbfgs', action='store_true', help='with --solver adam: also solve by L-BFGS and print both')
    p.add_argument('--knn', action=argparse.BooleanOptionalAction, default=True, help='kNN (k=20, cosine) too')
    p.add_argument('--floors', action='store_true', help='also probe a random network of the same shape and raw pixels')
    p.add_argument('--epochs', type=_at_least(1), default=90, help='adam: epochs; mae: epochs (MAE: 90) (default: %(default)s)')
    p.add_argument('--lr', type=_at_least(0, float), default=1e-3, help='adam: lr (default: %(default)s)')
    p.add_argument('--warmup-epochs', type=_at_least(0), default=10, help='mae: warmup epochs (MAE: 10)')
    p.add_argument('--batch-size', type=_at_least(1), default=16384, help='mae: batch (MAE: 16384), accumulated')
    p.add_argument('--micro-batch', type=_at_least(1), default=1024, help='mae: images per forward pass')
    p.add_argument('--blr', type=_at_least(0, float), default=0.1, help='mae: base lr, lr = blr * batch / 256 (MAE: 0.1)')
    p.add_argument('--batch-size-features', type=_at_least(1), default=512, help='images per forward pass of extraction')
    p.add_argument('--max-train', type=_at_least(0), default=0, help='a seeded subset of the train split (0: all)')
    p.add_argument('--max-test', type=_at_least(0), default=0)
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='write the result as JSON here')
    p.add_argument('--plot', help='grid: write the heat map here (PNG)')
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser('list', help='list models and pretrained tags', description='List the zoo\'s models and their '
                       'pretrained tags, marking the tags whose weights are on this machine.')
    p.add_argument('pattern', nargs='?', default='*', help='wildcard (default: all)')
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('info', help='describe a model', description="Print a model's configuration, sizes and weight "
                       'source.')
    p.add_argument('name', help='model name, alias or NAME.TAG')
    p.set_defaults(func=cmd_info)

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
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser('export', help='export a merged encoder as a plain timm checkpoint',
                       description='Merge an encoder at a fixed t and save it as a folder (model.safetensors, '
                                   'config.json, README.md) that timm loads without ldae_models.')
    p.add_argument('name', help='NAME.TAG, local-dir:PATH or hf-hub:ORG/NAME')
    p.add_argument('dst', help='output folder')
    p.add_argument('--t', type=float, help='timestep folded into the weights (default: the encoder\'s own)')
    p.add_argument('--checkpoint', help='weights file to load into NAME first')
    p.add_argument('--model-args', help='JSON object of model keyword arguments, e.g. \'{"depth": 6}\'')
    p.add_argument('--allow-random', action='store_true', help='export even when no weights are named')
    p.set_defaults(func=cmd_export)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv  # accepted anywhere on the line
    args = build_parser().parse_args([a for a in argv if a != '--debug'])
    debug = debug or os.environ.get('LDAE_MODELS_DEBUG', '') not in ('', '0')
    from .engine import PREEMPTED_EXIT_CODE, Preempted
    try:
        return args.func(args)
    except Preempted as e:  # SIGTERM / SIGUSR1: the checkpoint is written; a requeue resumes with --resume
        print(f'ldae-models {args.command}: {e}', file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except BrokenPipeError:  # the reader went away (`ldae-models list | head`): stop quietly, as Unix tools do
        sys.stdout = open(os.devnull, 'w')
        return 0
    except _USER_ERRORS as e:
        if debug or (isinstance(e, ImportError) and 'pip install' not in str(e)):
            raise
        print(f'ldae-models {args.command}: error: {e}\n(--debug shows the traceback)', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
