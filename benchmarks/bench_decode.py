"""Decoding and sampling cost of the streaming path, per CPU worker, side by side in one run.

Decode + resize (shorter side) + center crop of 500x375 JPEGs (ImageNet's typical size; synthetic photo-like images
made here, quality 90) to ``--size`` px, one image after another in this process (what one DataLoader worker does):

- ``pil_before``: the streaming path of ldae-models 0.2: Pillow decode at full size, then torchvision's
  ``Resize`` + ``CenterCrop`` on the PIL image;
- ``pil_draft``: ``data.decode_pil``, Pillow with ``Image.draft`` (DCT-domain reduction when the image is at least
  twice the size asked for: only below 188 px for 500x375);
- ``batched_cpu``: ``data.decode_batch`` on the CPU (torchvision's ``decode_jpeg`` on a batch, then the tensor resize),
  what a worker does when the batch is used on the CPU. On a GPU the decode runs there instead (not measured here).

Also the sampler: the cost of the step's indices for ImageNet-1k (1,281,167 images, batch 2048: 625 steps per epoch)
when a permutation is drawn every step (before) and once per epoch (now), per step.

    python benchmarks/bench_decode.py --images 200 --size 256 --out benchmarks/results/bench_decode.json
"""
import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldae_models.data import decode_batch, decode_pil


def photo_like(rng, h=375, w=500):
    x = np.linspace(0, 1, w)[None, :, None] * rng.uniform(50, 200, (1, 1, 3))
    y = np.linspace(0, 1, h)[:, None, None] * rng.uniform(0, 55, (1, 1, 3))
    a = (x + y + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, format='JPEG', quality=90)
    return b.getvalue()


def pil_before(data, size):
    from torchvision import transforms as T
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.PILToTensor()])
    with Image.open(io.BytesIO(data)) as im:
        return tf(im.convert('RGB'))


def timed(fn, items, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(items)
        times.append(time.perf_counter() - t0)
    return len(items) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--images', type=int, default=200)
    ap.add_argument('--size', type=int, nargs='+', default=[256, 128])
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--out')
    args = ap.parse_args()
    torch.set_num_threads(1)  # one worker = one core
    rng = np.random.default_rng(0)
    items = [photo_like(rng) for _ in range(args.images)]
    result = dict(images=args.images, source='500x375 JPEG, quality 90', threads=1, decode=[])
    for size in args.size:
        paths = dict(
            pil_before=lambda xs: [pil_before(x, size) for x in xs],
            pil_draft=lambda xs: [decode_pil(x, size) for x in xs],
            batched_cpu=lambda xs: [decode_batch(xs[i:i + 64], size) for i in range(0, len(xs), 64)])
        row = dict(size=size)
        for name, fn in paths.items():
            fn(items[:8])  # warm up
            row[f'{name}_img_s'] = round(timed(fn, items, args.rounds), 1)
        row['batched_cpu_vs_pil_before'] = round(row['batched_cpu_img_s'] / row['pil_before_img_s'], 2)
        result['decode'].append(row)
        print(json.dumps(row), flush=True)
    n, steps_per_epoch = 1_281_167, 1_281_167 // 2048
    t0 = time.perf_counter()
    for _ in range(3):
        torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    per_perm = (time.perf_counter() - t0) / 3
    result['sampler'] = dict(images=n, steps_per_epoch=steps_per_epoch, before_ms_per_step=round(1e3 * per_perm, 2),
                             now_ms_per_step=round(1e3 * per_perm / steps_per_epoch, 3))
    print(json.dumps(result['sampler']), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
    main()
