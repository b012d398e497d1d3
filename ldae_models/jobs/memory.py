"""The memory plan of a pre-training step on a GPU: which micro-batch fits, and whether to checkpoint.

- the memory of a step: weights, gradients and AdamW's moments in float32 (16 bytes a parameter), an EMA copy (4),
  autocast's bf16 copies of the weights (2), DistributedDataParallel's gradient buckets with several processes (4),
  and the activations of the micro-batch (``ACTIVATION_MIB``, measured);
- without gradient checkpointing while a micro-batch of at least ``MIN_EFFICIENT_MICRO`` images fits (accumulation
  costs nothing but the smaller matmuls), else with it (recomputation costs about a third more compute).

``plan_memory(model, batch, world, gpu_mem_gb)`` is what ``recipes.train_config`` and ``--gpu-mem-gb`` use;
``planned_gb`` is what a run logs beside the memory it measures.
"""
import functools
import math
from typing import Any, Dict, Tuple

from ..engine import accumulation_steps

__all__ = ['ACTIVATION_MIB', 'GPU_MEM_MARGIN', 'MIN_EFFICIENT_MICRO', 'param_count', 'static_bytes', 'planned_gb',
           'plan_memory']


# Activation MiB per image of the whole DAE's training step under bf16 autocast: (plain, gradient checkpointing).
# Measured on a CPU by `python benchmarks/bench_activation_memory.py` (autograd's saved tensors, each storage once;
# a GPU allocator adds some fragmentation on top, which GPU_MEM_MARGIN leaves room for).
ACTIVATION_MIB: Dict[str, Tuple[float, float]] = {
    'ldae_vit_tiny_patch4_32': (25.5, 1.4),
    'ldae_vit_base_patch16_256': (409.3, 24.9),
    'ldae_vit_halflarge_patch16_256': (628.2, 33.3),
    'ldae_vit_large_patch16_256': (1247.1, 57.3),
}
GPU_MEM_MARGIN = 0.85  # the share of a GPU's memory planned for (CUDA context, allocator slack, the data batch)
MIN_EFFICIENT_MICRO = 32  # below this many images per micro-batch, gradient checkpointing is preferred


@functools.lru_cache(maxsize=None)
def param_count(model: str) -> int:
    """The whole DAE's parameters (built on the meta device: no memory, no time)."""
    import torch
    from ..models import full_model
    with torch.device('meta'):
        return sum(p.numel() for p in full_model(model).parameters())


def static_bytes(params: int, ema: bool, world: int = 1, bf16: bool = True) -> int:
    """What a step holds besides activations: weights, gradients and AdamW's two moments in float32 (16 bytes a
    parameter), an EMA copy (4), autocast's bf16 copies of the weights (2), DDP's gradient buckets (4, with several
    processes)."""
    return params * (16 + (4 if ema else 0) + (2 if bf16 else 0) + (4 if world > 1 else 0))


def planned_gb(model: str, micro_batch: int, world: int, ema: bool, grad_checkpointing: bool) -> float:
    """The planned memory of one GPU's step (GB): ``static_bytes`` and the micro-batch's activations."""
    plain, ckpt = ACTIVATION_MIB[model]
    act = (ckpt if grad_checkpointing else plain) * 2 ** 20 * micro_batch
    return round((static_bytes(param_count(model), ema, world) + act) / 1e9, 1)


def plan_memory(model: str, batch_size: int, world: int, gpu_mem_gb: float, ema: bool = False,
                micro_batch: int = 0) -> Dict[str, Any]:
    """The micro-batch per GPU, the accumulation and whether to checkpoint, for ``batch_size`` over ``world`` GPUs of
    ``gpu_mem_gb`` GB each (``micro_batch`` fixes the micro-batch; checkpointing is then chosen by whether it fits).

    Raises:
        ValueError: a batch that ``world`` does not divide, a micro-batch that does not divide the per-GPU batch, a
            model without a measured activation size, or a GPU too small for one image.
    """
    if micro_batch:
        accumulation_steps(batch_size, world, micro_batch)  # divisibility, named
    elif batch_size % world:
        raise ValueError(f'--batch-size {batch_size} is not divisible by the {world} processes')
    per_gpu = batch_size // world
    if model not in ACTIVATION_MIB:
        raise ValueError(f'no measured activation memory for {model} (known: {", ".join(ACTIVATION_MIB)}): give '
                         f'--micro-batch and --grad-checkpointing yourself')
    plain, ckpt = (v * 2 ** 20 for v in ACTIVATION_MIB[model])
    fixed = static_bytes(param_count(model), ema, world)
    free = gpu_mem_gb * 1e9 * GPU_MEM_MARGIN - fixed
    fit_plain, fit_ckpt = max(0, int(free // plain)), max(0, int(free // ckpt))
    if fit_ckpt < 1:
        raise ValueError(f'--gpu-mem-gb {gpu_mem_gb:g} is too small for {model}: its weights, gradients, AdamW '
                         f'state, bf16 copies and gradient buckets take {fixed / 1e9:.1f} GB, and one image needs '
                         f'{ckpt / 2 ** 20:.0f} MiB more even with gradient checkpointing')
    if micro_batch:
        if micro_batch > fit_ckpt:
            raise ValueError(f'--micro-batch {micro_batch} does not fit in {gpu_mem_gb:g} GB for {model} (at most '
                             f'{fit_ckpt} with gradient checkpointing, {fit_plain} without)')
        micro, checkpointing = micro_batch, micro_batch > fit_plain
    else:
        use_plain = min(fit_plain, per_gpu) >= min(MIN_EFFICIENT_MICRO, per_gpu)
        fit = fit_plain if use_plain else fit_ckpt
        micro = _largest_divisor_at_most(per_gpu, fit)
        checkpointing = not use_plain
    return dict(micro_batch=micro, accum_steps=per_gpu // micro, grad_checkpointing=checkpointing,
                planned_gb=planned_gb(model, micro, world, ema, checkpointing), per_gpu_batch=per_gpu)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    best = 1
    for d in range(1, int(math.isqrt(n)) + 1):
        if n % d == 0:
            for q in (d, n // d):
                if best < q <= cap:
                    best = q
    return best
