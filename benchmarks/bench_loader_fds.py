"""File descriptors the main process holds per batch of the streaming loader's GPU path (JPEG bytes sent by the
workers, decoded where the batch is used), before and after, side by side in one run.

Under PyTorch's default sharing strategy (``file_descriptor``) every tensor a DataLoader worker sends costs the main
process one open file descriptor while it lives. Before, a batch was B separate byte tensors; now it is one ``Packed``
tensor of all the bytes plus its offsets. The run holds ``--hold`` batches at once (as prefetching and a step's
micro-batches do) and counts ``/proc/self/fd``:

    python benchmarks/bench_loader_fds.py --batch-sizes 256 1024 --out benchmarks/results/bench_loader_fds.json
"""
import argparse
import io
import json
import os
import resource
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from PIL import Image

from ldae_models.data import open_split, sequential, stream
from ldae_models.data.loader import _Collate, _Items, _PositionLists


def jpeg_npz(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(b, format='JPEG')
        blobs.append(b.getvalue())
    blobs = (blobs * (n // 64 + 1))[:n]
    np.savez(path, train_jpeg=np.frombuffer(b''.join(blobs), np.uint8),
             train_offsets=np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64),
             y_train=np.zeros(n, np.int64))
    return path


def open_fds() -> int:
    return len(os.listdir('/proc/self/fd'))


def before(split, batch: int, hold: int) -> List[Any]:
    """The previous GPU path: the workers return each image's bytes as its own tensor."""
    def collate(items):
        return [x for x, _ in items], split.labels[torch.tensor([i for _, i in items])]
    loader = torch.utils.data.DataLoader(_Items(split), batch_sampler=_PositionLists(
        list(sequential(len(split), batch))[:hold], hold), num_workers=2, collate_fn=collate)
    return [b for b in loader]


def after_bytes(split, batch: int, hold: int) -> List[Any]:
    """Now, what the workers send: one ``Packed`` tensor of bytes (and its offsets) per batch."""
    loader = torch.utils.data.DataLoader(_Items(split), batch_sampler=_PositionLists(
        list(sequential(len(split), batch))[:hold], hold), num_workers=2, collate_fn=_Collate(split, 16, False))
    return [b for b in loader]


def after(split, batch: int, hold: int) -> List[Any]:
    """Now, what the loop holds: the batches decoded where they are used (as on a GPU)."""
    return [b for b in stream(split, list(sequential(len(split), batch))[:hold], 16, 'cpu', workers=2,
                              decode_on='device')]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--batch-sizes', type=int, nargs='+', default=[256, 1024])
    ap.add_argument('--hold', type=int, default=4, help='batches held at once')
    ap.add_argument('--out')
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # room for the old path's descriptors
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch_sizes:
            split = open_split('npz', jpeg_npz(Path(tmp) / f'b{batch}.npz', batch * args.hold), 'train')
            for name, fn in (('before', before), ('after: the bytes sent', after_bytes),
                             ('after: the decoded batches', after)):
                base = open_fds()
                held = fn(split, batch, args.hold)
                fds = open_fds() - base
                rows.append(dict(path=name, batch=batch, batches_held=len(held), fds_held=fds,
                                 fds_per_batch=round(fds / len(held), 1)))
                print(json.dumps(rows[-1]), flush=True)
                del held
    result = dict(torch=torch.__version__, sharing_strategy=torch.multiprocessing.get_sharing_strategy(),
                  rlimit_nofile_default=soft, rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__':
    main()
