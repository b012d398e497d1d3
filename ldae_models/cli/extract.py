"""``ldae-models extract``: a data set's features at (layers, t), written as safetensors shards with an index
(``features.py``); ``probe --features`` reads them."""
import argparse
from pathlib import Path
from typing import Any, Dict, List

import torch

from .common import add_data_args, add_model_args, at_least, json_object, load_cli_model, say


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser('extract', help="write a data set's features to safetensors shards",
                       description='Extract pooled features of every image of a data set at chosen (layers, t) and '
                                   'write them as safetensors shards with an index (probe --features reads them).')
    add_model_args(p, default=None)
    add_data_args(p)
    add_feature_args(p)
    p.add_argument('--splits', nargs='+', default=['train', 'test'], choices=['train', 'test'])
    p.add_argument('--shard-size', type=at_least(1), default=50_000, help='rows per shard file')
    p.add_argument('--out', required=True, help='output folder (OUT/train, OUT/test)')
    p.set_defaults(run=run)


def add_feature_args(p: argparse.ArgumentParser) -> None:
    """The flags of a feature setting, shared by extract and probe."""
    p.add_argument('--full', action='store_true', help="the whole model (an l-DAE's decoder blocks too: layer E + k is "
                                                       'decoder block k); --checkpoint is then a whole-model file')
    p.add_argument('--layers', type=int, nargs='+', help='0-based layers (default: the last; probe --mode grid: all)')
    p.add_argument('--ts', type=float, nargs='+', help="timesteps (default: the model's t)")
    p.add_argument('--noisy-input', action='store_true', help="noise the input at each t (the paper's \"noisy input\")")
    p.add_argument('--max-train', type=at_least(0), default=None,
                   help='a seeded subset of the train split (default: all; with --features, what the folder holds)')
    p.add_argument('--max-test', type=at_least(0), default=None, help='a seeded subset of the test split')
    p.add_argument('--batch-size-features', type=at_least(1), default=512, help='images per forward pass')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    p.add_argument('--seed', type=int, default=None, help='seed of the subsets and the noise (default: 0)')


def subset_defaults(args: argparse.Namespace, folder: Any) -> List[str]:
    """Fill ``--max-train``, ``--max-test`` and ``--seed`` not given: from the feature folder's setting where it has
    one (so that a probe reads what extract wrote), else all images and seed 0. Returns the flags taken from it."""
    from ..features import read_feature_index
    stored: Dict[str, Any] = {}
    for split in ('train', 'test'):
        index = read_feature_index(Path(folder) / split) if folder else None
        if index is not None:
            stored = index
            break
    taken = []
    for field, flag, default in (('max_train', '--max-train', 0), ('max_test', '--max-test', 0), ('seed', '--seed', 0)):
        if getattr(args, field) is None:
            value = stored.get(field, default)
            setattr(args, field, value)
            if field in stored and value != default:
                taken.append(f'{flag} {value}')
    return taken


def feature_meta(args: argparse.Namespace, model: torch.nn.Module, split: str) -> Dict[str, Any]:
    """What a feature folder records of the setting that made it."""
    return dict(model=args.model, checkpoint=args.checkpoint, model_args=json_object(args.model_args), full=args.full,
                noisy_input=args.noisy_input, seed=args.seed, dataset=args.dataset, max_train=args.max_train,
                max_test=args.max_test, t_default=getattr(model, 't', None), split=split)


def split_of(args: argparse.Namespace, split: str):
    """One split, listed (its ``--max-train`` / ``--max-test`` subset, chosen before anything is decoded)."""
    from ..data import open_split
    limit = args.max_train if split == 'train' else args.max_test
    return open_split(args.dataset, args.data_root, split, download=args.download, limit=limit or 0,
                      seed=args.seed + (split == 'test'))


def features_of(args: argparse.Namespace, model: torch.nn.Module, cells: List[Any], device: torch.device,
                split: str, folder: Any, shard_size: int = 50_000, keep: bool = True):
    """(features, labels, seconds) of one split by way of a feature folder (``features.split_features``)."""
    from ..features import split_features
    out = Path(folder) / split if folder else None

    def skipped(lines: List[str]) -> None:
        for line in lines:
            say(f'skipped: {line}')
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / 'skipped_images.txt', 'a') as f:
                f.write(''.join(line + '\n' for line in lines))
    return split_features(model, lambda: split_of(args, split), cells, out, feature_meta(args, model, split),
                          noisy_input=args.noisy_input, batch_size=args.batch_size_features, device=device,
                          seed=args.seed + (split == 'test'), workers=args.workers, shard_size=shard_size, keep=keep,
                          log=say, desc=f'{split} features', bad='drop' if args.skip_bad_images else 'raise',
                          on_bad=skipped)


def run(args: argparse.Namespace) -> int:
    from ..data import check_data_root
    from ..engine import check_output, resolve_device
    from ..features import feature_cells
    check_output(args.out)
    check_data_root(args.dataset, args.data_root, args.splits, args.download,
                    hint='extract only the splits there are with --splits')
    taken = subset_defaults(args, args.out)
    if taken:
        say(f'{args.out} holds features of {", ".join(taken)}: taken from it')
    device = resolve_device(args.device)
    model = load_cli_model(args, merged=False).to(device)
    cells = feature_cells(model, args.layers or [-1], args.ts)  # checked before any data is read
    for split in args.splits:
        _, labels, _ = features_of(args, model, cells, device, split, args.out, args.shard_size, keep=False)
        print(f'{Path(args.out) / split}: {len(labels):,} images x {len(cells)} (block, t) cells')
    return 0
