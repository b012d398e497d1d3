"""The merged encoder eager, scripted (TorchScript) and compiled (``torch.compile``), side by side in one run.

The merged l-DAE encoder is timm's ViT with folded weights, so the paths timm offers for a ViT work for it; this
measures what they give on the machine at hand. Each round runs every variant once on the same batch in rotating
order; the median over rounds is reported with the ratio to eager, and the largest difference of each output from
eager's. ``torch.compile`` needs a C++ compiler on a CPU; its one-time compile time is reported apart.

    python benchmarks/bench_compiled.py --model ldae_vit_tiny_patch4_32 --batch-size 64 --rounds 10
"""
import argparse
import json
import platform
import statistics
import time
import warnings

import timm
import torch

import ldae_models  # noqa: F401  (registers the models)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='ldae_vit_tiny_patch4_32')
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--rounds', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--out')
    args = ap.parse_args()
    torch.manual_seed(0)
    eager = timm.create_model(args.model).eval()
    c, h, w = eager.pretrained_cfg['input_size']
    x = torch.randn(args.batch_size, c, h, w)
    variants = {'eager': eager}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TorchScript's deprecation notice
        variants['torchscript'] = torch.jit.freeze(torch.jit.script(eager))
    compiled = torch.compile(eager)
    t0 = time.perf_counter()
    compiled(x)
    compile_s = time.perf_counter() - t0
    variants['torch.compile'] = compiled
    ref = eager(x)
    diff = {k: float((m(x) - ref).abs().max()) for k, m in variants.items()}
    times = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.warmup + args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            variants[k](x)
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {k: dict(img_per_s=round(args.batch_size / med[k], 1), ratio_to_eager=round(med['eager'] / med[k], 3),
                    max_abs_diff=diff[k]) for k in names}
    res = dict(model=args.model, batch=args.batch_size, rounds=args.rounds, threads=torch.get_num_threads(),
               cpu=platform.processor() or platform.machine(), torch=torch.__version__, timm=timm.__version__,
               compile_s=round(compile_s, 1), rows=rows)
    for k, r in rows.items():
        print(f'{k:14s} {r["img_per_s"]:8.1f} img/s  x{r["ratio_to_eager"]:.3f}  max |diff| {r["max_abs_diff"]:.2e}')
    print(f'torch.compile: first call {compile_s:.1f} s')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
