"""The commands of ``ldae-models``: each reads its parsed arguments, calls the library, prints what it did. The
parser is in ``cli/__init__.py``; flags that are config fields come from ``cli/args.py``."""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .args import DEFAULT_MODEL, _config, _given, _json_object


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
    from ..models import full_model, load_model, names_weights
    checkpoint, model_args = getattr(args, 'checkpoint', None), _json_object(getattr(args, 'model_args', None))
    pretrained = getattr(args, 'pretrained', None)
    if getattr(args, 'full', False):
        kwargs.pop('merged', None)
        pretrained = names_weights(args.model) if pretrained is None else pretrained
        return full_model(args.model, pretrained=pretrained and not checkpoint, checkpoint=checkpoint,
                          **model_args, **kwargs).eval()
    return load_model(args.model, pretrained=pretrained, checkpoint=checkpoint, **model_args, **kwargs).eval()


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
    from ..features import extract_features, feature_key
    from ..hub.publish import save_safetensors
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
    from ..models import full_model, names_weights
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
    from ..plots import denoising_figure
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
    from . import main
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


def cmd_info(args: argparse.Namespace) -> int:
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


def cmd_convert(args: argparse.Namespace) -> int:
    from ..hub.checkpoint import read_checkpoint, unwrap_state_dict
    from ..hub.publish import FLOAT32_KEPT, cast_floats, save_safetensors
    _stage(f'reading {args.src}' + (f' into {args.model} (a strict load checks it)' if args.model else ''))
    if args.full:  # the whole model (an l-DAE's decoder and tokenizer too), checked by a strict load
        from ..models import full_model
        if not args.model:
            raise ValueError('--full needs --model (the architecture)')
        state = full_model(args.model, checkpoint=args.src, **_json_object(args.model_args)).state_dict()
    elif args.model:  # through the model's own filter and strict load: the result is known to fit
        from ..models import load_model
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
    from ..hub.publish import export_timm
    from ..models import names_weights
    if not (args.checkpoint or names_weights(args.name) or args.allow_random):
        raise ValueError(f'{args.name} names no weights: give a tag (NAME.TAG), local-dir:/hf-hub:, --checkpoint FILE, '
                         f'or --allow-random to export random weights')
    args.model, args.pretrained = args.name, None
    merged = _model(args, merged=True, **({} if args.t is None else {'t': args.t}))
    out = export_timm(merged, args.dst, source=args.name)
    print(f'wrote {out} (timm ViT merged at t={merged.t:g}); load it with timm alone: '
          f"timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


# -- train and distill -----------------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train
    given = _given(TrainConfig, args)
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if args.recipe:
        from ..recipes import train_config
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
    from ..distill import DistillConfig, distill
    if args.recipe:
        from ..recipes import distill_config
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
    from ..data import open_split
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
    from ..features import cached_features, dataset_features
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
    from ..data import split_exists
    from ..features import feature_cells
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
    from ..plots import plot_grid
    from ..probe import grid_to_json, mae_linear_probe, probe_features, write_json
    device = _device(args.device)
    model = _model(args, merged=False, **({} if args.t is None else {'t': args.t})).to(device)
    from ..features import feature_cells
    # the cells, checked against the model before any data is read
    layers = args.layers or ([-1] if args.mode != 'grid' else list(range(model.num_taps)))
    cells = feature_cells(model, layers[:1] if args.mode == 'mae' else layers, [args.t] if args.mode == 'mae' else args.ts)
    result: Dict[str, Any] = dict(model=args.model, checkpoint=args.checkpoint, mode=args.mode, dataset=args.dataset,
                                  noisy_input=args.noisy_input, device=str(device))
    if args.mode == 'mae':
        from ..engine import process_group
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
    from ..probe import floors
    result = floors(model, _split(args, 'train'), _split(args, 'test'), layer=layer, knn=args.knn,
                    batch_size=args.batch_size_features, progress=True, log=_stage, workers=args.workers, **pk)
    for name, r in result.items():
        print(f'floor {name}: linear top-1 {r["top1"]:.2f}%' + (f', kNN {r["knn_top1"]:.2f}%' if 'knn_top1' in r else ''))
    return result
