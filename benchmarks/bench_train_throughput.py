"""Training throughput of the l-DAE objective beside timm's ViT: images/s, model FLOPs and MFU, side by side.

For each size, one full training step (forward, loss, backward, fused AdamW step) is timed for:

- ``ldae``: the whole l-DAE step as ``ldae-models train`` runs it (``DenoisingObjective``: latent noise through the PCA
  tokenizer in float32, encoder + decoder, the loss in the PCA basis), its t and noise drawn on the device;
- ``timm_vit``: the step a user would otherwise write, timm's ``VisionTransformer`` with the same width, the same number
  of blocks (encoder + decoder) and tokens (no class token), regressing its output tokens onto the patches with an MSE.

Same batch, same precision (bf16 autocast on a GPU; ``--amp`` decides on a CPU), timed in rotating order, median over
rounds. Model FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode``; MFU is achieved
FLOP/s over the peak this script measures on the same device (the best n x n x n matrix-product rate), so the ratio
is against what this card does, not a datasheet.

    python benchmarks/bench_train_throughput.py                                  # tiny, small at 32 px; B, L at 256
    python benchmarks/bench_train_throughput.py --models ldae_vit_tiny_patch4_32 --batch-sizes 128 --rounds 3

Prints one JSON line per row and a table; ``--out`` writes JSON.
"""
import argparse
import contextlib
import json
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from timm.models import VisionTransformer

from ldae_models.models import full_model
from ldae_models.engine import resolve_amp
from ldae_models.jobs.pretrain import DenoisingObjective, TrainConfig

DEFAULT_MODELS = ['ldae_vit_tiny_patch4_32', 'ldae_vit_small_patch4_32', 'ldae_vit_base_patch16_256',
                  'ldae_vit_large_patch16_256']
DEFAULT_BATCH = [1024, 1024, 256, 64]


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def measured_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of n x n x n matrix products (the card's practical matmul peak)."""
    n, reps = (8192, 10) if device.type == 'cuda' else (2048, 3)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
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


def ldae_step(name: str, batch: int, device: torch.device, amp: Optional[Dict[str, Any]], compile_: bool):
    dae = full_model(name).to(device)
    size = dae.encoder.input_size()
    images = torch.rand(batch, *size, device=device) * 2 - 1
    dae.fit_tokenizer([images[:64]])
    net = DenoisingObjective(dae, TrainConfig(model=name))
    net = torch.compile(net) if compile_ else net
    gen = torch.Generator(device).manual_seed(0)
    shape = dae.noise_shape(images)
    opt = torch.optim.AdamW(dae.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == 'cuda')

    def step() -> None:
        t = dae.schedule.sample_t(batch, generator=gen, device=device)
        noise = torch.randn((batch, *shape), generator=gen, device=device)
        with torch.autocast(**amp) if amp else contextlib.nullcontext():
            loss = net(images, None, t, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    args = dae.encoder.vit_args()
    return step, dict(depth=len(dae.blocks), embed_dim=args['embed_dim'], num_heads=args['num_heads'],
                      patch_size=args['patch_size'], img_size=args['img_size'], params=sum(p.numel() for p in dae.parameters()))


def timm_step(shape: Dict[str, Any], batch: int, device: torch.device, amp: Optional[Dict[str, Any]], compile_: bool):
    vit = VisionTransformer(img_size=shape['img_size'], patch_size=shape['patch_size'], embed_dim=shape['embed_dim'],
                            depth=shape['depth'], num_heads=shape['num_heads'], class_token=False, global_pool='',
                            num_classes=0, act_layer='gelu_tanh').to(device)
    p = shape['patch_size']
    head = torch.nn.Linear(shape['embed_dim'], 3 * p * p).to(device)  # tokens -> patches, as the DAE's final layer
    images = torch.rand(batch, 3, *shape['img_size'], device=device) * 2 - 1
    target = F.unfold(images, p, stride=p).transpose(1, 2)  # (B, N, 3 p p)
    fwd = torch.compile(vit.forward_features) if compile_ else vit.forward_features
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.type == 'cuda')

    def step() -> None:
        with torch.autocast(**amp) if amp else contextlib.nullcontext():
            loss = F.mse_loss(head(fwd(images)).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def count_flops(step: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def bench_pair(name: str, batch: int, rounds: int, device: torch.device, amp: Optional[Dict[str, Any]],
               compile_: bool) -> List[Dict[str, Any]]:
    ours, shape = ldae_step(name, batch, device, amp, compile_)
    peer = timm_step(shape, batch, device, amp, compile_)
    steps = {'ldae': ours, 'timm_vit': peer}
    flops = {k: count_flops(s) for k, s in steps.items()}
    for s in steps.values():  # warm-up (and compilation)
        for _ in range(3 if device.type == 'cuda' else 1):
            s()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    names = list(steps)
    reps = 10 if device.type == 'cuda' else 1
    for r in range(rounds):
        for k in names[r % 2:] + names[:r % 2]:  # rotating order
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                steps[k]()
            sync(device)
            times[k].append((time.perf_counter() - t0) / reps)
    rows = []
    for k in names:
        dt = statistics.median(times[k])
        rows.append(dict(model=name, step=k, batch=batch, img_size=shape['img_size'], blocks=shape['depth'],
                         width=shape['embed_dim'], step_s=round(dt, 5), img_per_s=round(batch / dt, 1),
                         tflop_per_step=round(flops[k] / 1e12, 4), achieved_tflops=round(flops[k] / dt / 1e12, 3)))
    rows[0]['ratio_to_timm'] = round(rows[0]['img_per_s'] / rows[1]['img_per_s'], 3)
    return rows


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 matmuls and convolutions inside the block only (the float32 peak and timm's step are measured with it, as
    a GPU trainer runs); the process's settings are restored on leaving."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def run(models: List[str], batch_sizes: List[int], rounds: int = 5, amp_mode: str = 'auto', compile_: bool = False,
        device: Optional[str] = None) -> Dict[str, Any]:
    """The table as data (the campaign calls this); TF32 on a GPU inside this call only."""
    dev = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    with tf32(dev.type == 'cuda'):
        return _run(models, batch_sizes, rounds, amp_mode, compile_, dev)


def _run(models: List[str], batch_sizes: List[int], rounds: int, amp_mode: str, compile_: bool,
         dev: torch.device) -> Dict[str, Any]:
    amp = resolve_amp(amp_mode, dev)
    peak = measured_peak(dev, torch.bfloat16 if amp else torch.float32)
    info = dict(device=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)',
                precision='bf16 autocast' if amp else 'float32', measured_peak_tflops=round(peak / 1e12, 2),
                torch=torch.__version__, compile=compile_, rounds=rounds)
    print(json.dumps(info), flush=True)
    sizes = batch_sizes * len(models) if len(batch_sizes) == 1 else batch_sizes
    rows = []
    for name, batch in zip(models, sizes):
        for row in bench_pair(name, batch, rounds, dev, amp, compile_):
            row['mfu'] = round(row['achieved_tflops'] * 1e12 / peak, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if dev.type == 'cuda':
            torch.cuda.empty_cache()
    return dict(info, rows=rows)


def table(result: Dict[str, Any]) -> str:
    lines = [f"{result['device']}, {result['precision']}, measured peak {result['measured_peak_tflops']} TFLOP/s",
             '', '| model, batch | step | img/s | TFLOP/step | MFU | ours / timm ViT |', '|---|---|---|---|---|---|']
    for r in result['rows']:
        lines.append(f"| {r['model']}, {r['batch']} | {r['step']} | {r['img_per_s']:,} | {r['tflop_per_step']} | "
                     f"{r['mfu']:.3f} | {r.get('ratio_to_timm', '')} |")
    return '\n'.join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--models', nargs='+', default=DEFAULT_MODELS)
    ap.add_argument('--batch-sizes', type=int, nargs='+', default=DEFAULT_BATCH, help='one per model (or one for all)')
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--amp', choices=['auto', 'bf16', 'off'], default='auto')
    ap.add_argument('--compile', action='store_true')
    ap.add_argument('--out')
    args = ap.parse_args()
    result = run(args.models, args.batch_sizes, args.rounds, args.amp, args.compile)
    print(table(result))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
