"""Peak host memory of ``ldae-models extract`` and ``ldae-models probe`` against the number of images.

Each point is a fresh process (``resource.getrusage(...).ru_maxrss`` of the process; ``--workers 0`` so that the
decoding happens in that process and is counted). The images are a synthetic ImageFolder of photo-like JPEGs made
here (``--side`` px on the shorter side, 4:3), the model a one-block ViT of the l-DAE family at ``--side`` px (its
compute is not what is measured). ``--src`` runs another checkout of the package (e.g. an older release) side by side.

    python benchmarks/bench_eval_memory.py --counts 250 1000 4000 --side 128 --out benchmarks/results/bench_eval_memory.json
    python benchmarks/bench_eval_memory.py --counts 250 1000 4000 --side 128 --src OLD_CHECKOUT --out old.json
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

_PEAK = """
import resource, sys
from ldae_models.cli import main
code = main(sys.argv[1:])
print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def make_folder(root: Path, n: int, side: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    h, w = side, side * 4 // 3
    for split, count in (('train', n), ('test', 50)):
        for i in range(count):
            x = np.linspace(0, 1, w)[None, :, None] * rng.uniform(50, 200, (1, 1, 3))
            y = np.linspace(0, 1, h)[:, None, None] * rng.uniform(0, 55, (1, 1, 3))
            a = (x + y + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
            d = root / split / f'c{i % 10}'
            d.mkdir(parents=True, exist_ok=True)
            b = io.BytesIO()
            Image.fromarray(a).save(b, format='JPEG', quality=90)
            (d / f'{i:06d}.jpg').write_bytes(b.getvalue())


def peak_mb(args, src):
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    if src:
        env['PYTHONPATH'] = str(src)
    r = subprocess.run([sys.executable, '-c', _PEAK] + args, capture_output=True, text=True, env=env,
                       cwd=src or None)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return int(r.stdout.split('PEAK_KB')[-1].split()[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--counts', type=int, nargs='+', default=[250, 1000, 4000])
    ap.add_argument('--side', type=int, default=128)
    ap.add_argument('--src', help='a checkout whose ldae_models to run (default: the installed one)')
    ap.add_argument('--out')
    args = ap.parse_args()
    model_args = json.dumps(dict(img_size=args.side, patch_size=16, depth=1, embed_dim=32, num_heads=2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / 'folder'
        make_folder(root, max(args.counts), args.side)
        for n in args.counts:
            common = ['--model', 'ldae_vit_tiny_patch4_32', '--model-args', model_args, '--dataset', 'folder',
                      '--data-root', str(root), '--max-train', str(n), '--batch-size-features', '100']
            if not args.src:
                common += ['--workers', '0']
            ext = peak_mb(['extract'] + common + ['--splits', 'train', '--out', str(Path(tmp) / f'x{n}')], args.src)
            prb = peak_mb(['probe'] + common + ['--floors'], args.src)
            row = dict(images=n, decoded_mb=round(n * 3 * args.side ** 2 / 2**20, 1), extract_peak_mb=round(ext, 1),
                       probe_peak_mb=round(prb, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(side=args.side, src=bool(args.src), rows=rows), indent=1) + '\n')


if __name__ == '__main__':
    main()
