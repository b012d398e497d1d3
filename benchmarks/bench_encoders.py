"""Encoder speed: merged l-DAE encoder vs conditional encoder vs timm's plain ViT of the same size.

Rows: ``plain_vit`` is timm's default ViT of the same width, depth and input (class token, final norm,
exact GELU); ``plain_vit_gelu_tanh`` is the same with DiT's tanh-approximate GELU, the activation l-DAE
uses, so it differs from the merged encoder only in the class token and final norm: the ratio
merged / plain_vit_gelu_tanh measures what merging costs (the target is >= 0.97). On CPUs PyTorch's
tanh-GELU kernel is slower than the exact one; the script times both kernels so the gap to
``plain_vit`` is explained by a number, not a guess.

All models are timed in one process, side by side: each round runs every model once on the same
batch, in rotating order, and the reported time is the median over rounds. Images/s and the ratios to
the plain ViT are printed (and written as JSON with --out).

    python benchmarks/bench_encoders.py --model ldae_vit_base_patch16_256 --batch-size 8 --rounds 15
    python benchmarks/bench_encoders.py --model dit_s_patch2_256 --batch-size 16 --rounds 15   # DiT encoders too
"""
import argparse
import json
import platform
import statistics
import time

import timm
import torch
from timm.models import VisionTransformer

import ldae_models  # noqa: F401  (registers the models)


def build(name: str, t: int):
    torch.manual_seed(0)
    cond = timm.create_model(name, merged=False, t=t).eval()
    merged = cond.merge(t).eval()
    args = cond.vit_args()
    # timm's ordinary ViT of the same width, depth and input: class token, final norm, exact GELU.
    size = {k: args[k] for k in ('img_size', 'in_chans', 'patch_size', 'embed_dim', 'depth', 'num_heads')}
    plain = VisionTransformer(**size, num_classes=0).eval()
    plain_tanh = VisionTransformer(**size, num_classes=0, act_layer='gelu_tanh').eval()
    return {'plain_vit': plain, 'plain_vit_gelu_tanh': plain_tanh, 'merged': merged, 'conditional': cond}


@torch.inference_mode()
def gelu_kernels(width: int, tokens: int, reps: int = 30):
    """Milliseconds per call of exact and tanh GELU on a (tokens, 4 * width) tensor."""
    x = torch.randn(tokens, 4 * width)
    out = {}
    for approx in ('none', 'tanh', 'none', 'tanh'):
        torch.nn.functional.gelu(x, approximate=approx)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.gelu(x, approximate=approx)
        out[approx] = (time.perf_counter() - t0) / reps * 1e3
    return out


@torch.inference_mode()
def bench(models, x, rounds: int, warmup: int):
    times = {k: [] for k in models}
    names = list(models)
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            models[k](x)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='ldae_vit_base_patch16_256')
    ap.add_argument('--batch-size', type=int, default=8)
    ap.add_argument('--rounds', type=int, default=15)
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--t', type=int, default=10)
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    ap.add_argument('--out', default=None, help='write the result as JSON here')
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build(args.model, args.t)
    size = models['merged'].patch_embed.img_size
    x = torch.randn(args.batch_size, models['conditional'].in_chans, *size)
    med = bench(models, x, args.rounds, args.warmup)
    ips = {k: args.batch_size / v for k, v in med.items()}
    tokens = args.batch_size * models['merged'].patch_embed.num_patches
    gelu = gelu_kernels(models['merged'].embed_dim, tokens)
    result = dict(
        model=args.model, batch_size=args.batch_size, rounds=args.rounds, threads=torch.get_num_threads(),
        device='cpu', cpu=platform.processor() or platform.machine(), torch=torch.__version__, timm=timm.__version__,
        images_per_s=ips, ratio_to_plain={k: ips[k] / ips['plain_vit'] for k in ips},
        ratio_merged_to_conditional=ips['merged'] / ips['conditional'],
        ratio_merged_to_same_activation_vit=ips['merged'] / ips['plain_vit_gelu_tanh'],
        gelu_ms_per_call=dict(exact=gelu['none'], tanh=gelu['tanh']))
    print(f"{args.model}  batch {args.batch_size}  {torch.get_num_threads()} threads  median of {args.rounds} rounds")
    for k in ('plain_vit', 'plain_vit_gelu_tanh', 'merged', 'conditional'):
        print(f'  {k:20s} {ips[k]:9.2f} img/s   ratio to plain_vit {ips[k] / ips["plain_vit"]:.3f}')
    print(f'  merged / plain_vit_gelu_tanh  {result["ratio_merged_to_same_activation_vit"]:.3f}   (target >= 0.97)')
    print(f'  merged / conditional          {result["ratio_merged_to_conditional"]:.3f}')
    print(f'  GELU kernel on this CPU: exact {gelu["none"]:.2f} ms, tanh {gelu["tanh"]:.2f} ms per call '
          f'({tokens} x {4 * models["merged"].embed_dim})')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
