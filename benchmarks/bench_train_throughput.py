"""Training throughput of the l-DAE objective: images/s and model FLOP utilisation (MFU).

For each model, one full training step (forward, loss, backward, AdamW step) is timed as ``ldae-models train`` runs
it (bf16 autocast on a GPU; ``--amp`` decides on a CPU). Model FLOPs per step are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and attention, forward and backward); MFU is
achieved FLOP/s over the device's peak, which the script measures itself as the best bf16 (or float32) matrix
product rate of a few large square products, so the ratio is against what this card can do, not a datasheet.

    python benchmarks/bench_train_throughput.py                       # tiny, small at 32 px; ViT-B at 256 px
    python benchmarks/bench_train_throughput.py --models ldae_vit_tiny_patch4_32 --batch-sizes 256 --steps 5

Prints one JSON line per model and writes ``--out`` (JSON) when given.
"""
import argparse
import json
import time

import torch

import ldae_models
from ldae_models import train as T


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def measured_peak(device, dtype, n=8192, reps=10):
    """Best FLOP/s of n x n x n matrix products (the card's practical matmul peak)."""
    if device.type == 'cpu':
        n, reps = 2048, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def step_flops(dae, images, amp):
    """Model FLOPs of one training step (forward + backward), counted by PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    seeds = list(range(images.shape[0]))
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(**amp) if amp else torch.autocast('cpu', enabled=False):
            loss = T.compute_loss(dae, images, seeds)
        loss.backward()
    dae.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench(name, batch, steps, device, amp, compile_):
    dae = ldae_models.create_dae(name).to(device)
    size = dae.encoder.patch_embed.img_size
    images = torch.rand(batch, 3, *size, device=device) * 2 - 1
    dae.fit_tokenizer([images[:64]])
    flops = step_flops(dae, images, amp)
    net = torch.compile(dae) if compile_ else dae
    opt = torch.optim.AdamW(dae.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == 'cuda')
    seeds = list(range(batch))

    def one():
        with torch.autocast(**amp) if amp else torch.autocast('cpu', enabled=False):
            loss = T.compute_loss(net, images, seeds)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3 if device.type == 'cuda' else 1):  # warm-up (and compilation)
        one()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None
    return dict(model=name, img_size=list(size), batch=batch, step_s=round(dt, 4), img_per_s=round(batch / dt, 1),
                tflop_per_step=round(flops / 1e12, 3), achieved_tflops=round(flops / dt / 1e12, 2),
                peak_mem_gib=round(mem, 2) if mem else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--models', nargs='+', default=['ldae_vit_tiny_patch4_32', 'ldae_vit_small_patch4_32',
                                                    'ldae_vit_base_patch16_256'])
    ap.add_argument('--batch-sizes', type=int, nargs='+', default=[1024, 1024, 256],
                    help='one per model (or one for all)')
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--amp', choices=['auto', 'bf16', 'off'], default='auto')
    ap.add_argument('--compile', action='store_true')
    ap.add_argument('--out')
    args = ap.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    use_bf16 = args.amp == 'bf16' or (args.amp == 'auto' and device.type == 'cuda')
    amp = dict(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else None
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = measured_peak(device, torch.bfloat16 if use_bf16 else torch.float32)
    dev_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)'
    info = dict(device=dev_name, precision='bf16 autocast' if use_bf16 else 'float32',
                measured_peak_tflops=round(peak / 1e12, 1), torch=torch.__version__, compile=args.compile)
    print(json.dumps(info), flush=True)
    sizes = args.batch_sizes * len(args.models) if len(args.batch_sizes) == 1 else args.batch_sizes
    rows = []
    for name, batch in zip(args.models, sizes):
        row = bench(name, batch, args.steps, device, amp, args.compile)
        row['mfu'] = round(row['achieved_tflops'] * 1e12 / peak, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(info, rows=rows), f, indent=2)


if __name__ == '__main__':
    main()
