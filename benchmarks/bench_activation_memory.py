"""Memory and cost of an l-DAE training step per image: activations with and without gradient checkpointing under
bf16, and FLOPs (forward + backward, PyTorch's counter) with what they mean for a paper-length run.

The tensors autograd saves for the backward pass are summed (each storage once) while the whole DAE computes its
training loss under bf16 autocast on a small batch; divided by the batch this is the activation memory per image
that a GPU must hold at the peak of a step (plus the weights, their gradients, AdamW's two moments and, with EMA, a
copy: ``memory.static_bytes``). The memory plan
(``ldae_models/jobs/memory.py``, ``ACTIVATION_MIB``) picks the micro-batch from this table.
The cost columns: GPU-hours of ``--epochs`` over ImageNet-1k's 1,281,167 images at ``--mfu`` of an H100's dense
bf16 peak (989 TFLOP/s), and the wall time on 8 such GPUs when the data loader keeps up (not measured on a GPU).

    python benchmarks/bench_activation_memory.py --models ldae_vit_base_patch16_256 ldae_vit_halflarge_patch16_256 \\
        ldae_vit_large_patch16_256 --out benchmarks/results/bench_activation_memory_cpu.json
"""
import argparse
import json

import torch

from ldae_models.models import full_model


def saved_bytes(dae: torch.nn.Module, images: torch.Tensor) -> int:
    seen, total = set(), [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    t = dae.schedule.sample_t(len(images), generator=g)
    noise = torch.randn((len(images), *dae.noise_shape(images)), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            loss = dae.training_loss(images, t, noise)
    del loss
    return total[0]


def step_flops(dae: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one training step (forward and backward) on ``images``."""
    from torch.utils.flop_counter import FlopCounterMode
    g = torch.Generator().manual_seed(0)
    t = dae.schedule.sample_t(len(images), generator=g)
    noise = torch.randn((len(images), *dae.noise_shape(images)), generator=g)
    with FlopCounterMode(display=False) as counter:
        dae.training_loss(images, t, noise).backward()
    dae.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--models', nargs='+', default=['ldae_vit_base_patch16_256'])
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--epochs', type=int, default=400)
    ap.add_argument('--mfu', type=float, default=0.4)
    ap.add_argument('--out')
    args = ap.parse_args()
    rows = {}
    for name in args.models:
        torch.manual_seed(0)
        dae = full_model(name).train()
        size = dae.encoder.patch_embed.img_size[0]
        images = torch.rand(args.batch, 3, size, size) * 2 - 1
        dae.fit_tokenizer([images])
        row = dict(params=sum(p.numel() for p in dae.parameters()))
        for ckpt in (False, True):
            dae.set_grad_checkpointing(ckpt)
            row['checkpointing' if ckpt else 'plain'] = round(saved_bytes(dae, images) / args.batch / 2 ** 20, 1)
        dae.set_grad_checkpointing(False)
        flops = step_flops(dae, images) / args.batch
        gpu_h = flops * 1_281_167 * args.epochs / (989.4e12 * args.mfu) / 3600
        row.update(gflop_per_image=round(flops / 1e9, 1), gpu_hours=round(gpu_h), hours_on_8_gpus=round(gpu_h / 8, 1))
        rows[name] = row
        print(f'{name}: {row["params"] / 1e6:.1f}M parameters; activation MiB per image: plain {row["plain"]}, '
              f'checkpointing {row["checkpointing"]}; {row["gflop_per_image"]} GFLOP per image; {args.epochs} epochs: '
              f'{row["gpu_hours"]} GPU-hours at {args.mfu:.0%} MFU, {row["hours_on_8_gpus"]} h on 8', flush=True)
    res = dict(unit='MiB per image, bf16 autocast', batch=args.batch, epochs=args.epochs, mfu=args.mfu,
               peak_tflops='H100 bf16 dense 989.4', rows=rows)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
