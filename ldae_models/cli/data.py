"""The data commands: ``check-data`` (every image of a data set through the zoo's decoder: the ones that do not decode,
listed before a long run) and ``pack`` (a data set, or a seeded subset of it, as one .npz file in the layout
``--dataset npz`` reads: JPEG bytes and their offsets, labels, class names)."""
import argparse
import io
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from .common import at_least, say


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..data import DATASETS
    p = sub.add_parser('check-data', help='list the images of a data set that cannot be decoded',
                       description="Decode every image of a data set with the zoo's decoder (the one training and "
                                   'extraction use), with progress; print each one that cannot be read or decoded, '
                                   'write the list to --out, and exit with status 1 when there is any.')
    _data_flags(p, DATASETS)
    p.add_argument('--splits', nargs='+', default=['train', 'test'], choices=['train', 'test'])
    p.add_argument('--out', help='write the unreadable files here, one per line')
    p.add_argument('--batch-size', type=at_least(1), default=256, help='images per decoded batch')
    p.set_defaults(run=run_check)

    p = sub.add_parser('pack', help='write a data set (or a subset) as one .npz file (--dataset npz)',
                       description='Write the train and test splits of a data set as one .npz file in the layout '
                                   '--dataset npz reads ({split}_jpeg + {split}_offsets, y_{split}, classes): JPEG '
                                   'files are kept as they are, other images encoded as JPEG (--quality). '
                                   '--max-train / --max-test keep a seeded subset; --max-bytes keeps the test split '
                                   'whole where it can and the largest seeded subset of the train split that fits.')
    _data_flags(p, DATASETS)
    p.add_argument('--out', required=True, help='the .npz file to write')
    p.add_argument('--max-train', type=at_least(0), default=0, help='a seeded subset of the train split (0: all)')
    p.add_argument('--max-test', type=at_least(0), default=0, help='a seeded subset of the test split (0: all)')
    p.add_argument('--max-bytes', type=at_least(0), default=0, help='at most this many bytes of images (0: no limit)')
    p.add_argument('--quality', type=at_least(1), default=95, help='JPEG quality of encoded images (default: 95)')
    p.add_argument('--seed', type=int, default=0, help='seed of the subsets (default: 0)')
    p.add_argument('--raw', action='store_true', help='store decoded pixels (x_{split}, N x H x W x 3 uint8: exact, '
                   'larger) instead of JPEG bytes; the images must share one size (CIFAR-10)')
    p.set_defaults(run=run_pack)


def _data_flags(p: argparse.ArgumentParser, datasets) -> None:
    p.add_argument('--dataset', choices=datasets, default='folder', help='(default: %(default)s)')
    p.add_argument('--data-root', '--data-dir', dest='data_root', help='the data set (see ldae-models train --help)')
    p.add_argument('--download', action='store_true', help='download CIFAR-10 where the network allows')
    p.add_argument('--workers', type=at_least(-1), default=-1, help='DataLoader workers (-1: from the core count)')


def run_check(args: argparse.Namespace) -> int:
    import contextlib
    from ..data import check_data_root, open_split, sequential, stream
    from ..progress import Progress
    check_data_root(args.dataset, args.data_root, args.splits, args.download,
                    hint='check only the splits there are with --splits')
    bad: List[str] = []

    def found(lines: List[str]) -> None:
        for line in lines:
            print(line, flush=True)
        bad.extend(lines)
    total = 0
    for split in args.splits:
        data = open_split(args.dataset, args.data_root, split, download=args.download)
        n = len(data)
        total += n
        batches = stream(data, sequential(n, args.batch_size), 64, 'cpu', args.workers, -(-n // args.batch_size),
                         bad='drop', on_bad=found, decode_on='worker')
        with Progress(n, f'check {split}') as bar, contextlib.closing(batches):
            done = 0
            for images, _ in batches:
                step = min(args.batch_size, n - done)
                done += step
                bar.update(step)
    if args.out:
        Path(args.out).write_text(''.join(line.split(': cannot ')[0] + '\n' for line in bad))
    say(f'{total:,} images checked: {len(bad)} cannot be decoded' + (f' (listed in {args.out})' if args.out and bad
                                                                      else ''))
    return 1 if bad else 0


def _jpeg(item, quality: int) -> bytes:
    """An item as JPEG bytes: JPEG files as they are, anything else decoded and encoded at ``quality``."""
    from PIL import Image
    from ..data import decode_pil, is_jpeg
    if torch.is_tensor(item) and item.ndim == 1 and is_jpeg(item):
        return item.numpy().tobytes()
    img = item if (torch.is_tensor(item) and item.ndim == 3) else decode_pil(item)
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(buf, format='JPEG', quality=quality)
    return buf.getvalue()


class _Blob(np.ndarray):
    """Decoded pixels (H, W, 3) that measure their bytes like encoded ones (``len``: for --max-bytes)."""

    def __len__(self) -> int:
        return self.nbytes


def _pixels(item, name: str) -> np.ndarray:
    """An item's decoded pixels (H, W, 3) uint8, exactly as stored (no resize)."""
    from ..data import decode_batch
    img = decode_batch([item], None, names=[name])[0]
    return img.permute(1, 2, 0).contiguous().numpy().view(_Blob)


def run_pack(args: argparse.Namespace) -> int:
    from ..data import check_data_root, open_split
    from ..progress import Progress
    if not args.out.endswith('.npz'):
        raise ValueError(f'--out {args.out}: the file must end in .npz')
    if Path(args.out).is_dir():
        raise ValueError(f'--out {args.out} is a folder: name the .npz file to write')
    check_data_root(args.dataset, args.data_root, ('train', 'test'), args.download)
    splits: Dict[str, Dict[str, np.ndarray]] = {}
    classes: List[str] = []
    for split, limit in (('train', args.max_train), ('test', args.max_test)):
        data = open_split(args.dataset, args.data_root, split, download=args.download, limit=limit,
                          seed=args.seed + (split == 'test'))
        if limit == 0:  # a seeded order, so that --max-bytes keeps a random subset
            data = data.take(torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + (
                split == 'test'))))
        classes = data.classes
        blobs = []
        with Progress(len(data), f'pack {split}') as bar:
            for i in range(len(data)):
                blobs.append(_pixels(data.item(i), data.name(i)) if args.raw else _jpeg(data.item(i), args.quality))
                bar.update(1)
        splits[split] = dict(blobs=blobs, labels=data.labels.numpy())
    sizes = {s: np.cumsum([0] + [len(b) for b in v['blobs']]) for s, v in splits.items()}  # bytes of the first k
    keep = {s: len(v['blobs']) for s, v in splits.items()}
    if args.max_bytes and sizes['train'][-1] + sizes['test'][-1] > args.max_bytes:
        room = args.max_bytes - sizes['test'][-1]  # the train split gives way first: the test split stays whole
        if room > 0:
            keep['train'] = int(np.searchsorted(sizes['train'], room, side='right')) - 1
        else:
            keep['train'] = 0
            keep['test'] = int(np.searchsorted(sizes['test'], args.max_bytes, side='right')) - 1
    arrays = dict(classes=np.array(classes))
    for s, v in splits.items():
        blobs = v['blobs'][:keep[s]]
        if args.raw:
            shapes = {b.shape for b in blobs}
            if len(shapes) > 1:
                raise ValueError(f'--raw needs images of one size; the {s} split has {sorted(shapes)[:3]}')
            arrays[f'x_{s}'] = np.stack(blobs) if blobs else np.zeros((0, 32, 32, 3), np.uint8)
        else:
            arrays[f'{s}_jpeg'] = np.frombuffer(b''.join(blobs), dtype=np.uint8)
            arrays[f'{s}_offsets'] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f'y_{s}'] = v['labels'][:keep[s]].astype(np.int64)
    tmp = args.out + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, args.out)
    print(f'wrote {args.out}: {keep["train"]:,} train / {keep["test"]:,} test images, '
          f'{os.path.getsize(args.out) / 2 ** 20:.1f} MiB')
    return 0
