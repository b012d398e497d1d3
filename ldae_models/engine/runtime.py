"""Where a run executes: its processes (torchrun), device and precision, its counter-based seeds, and the
signals that stop it."""
import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data.loader import STOP_SIGNALS

__all__ = ['step_seed', 'process_group', 'setup_distributed', 'resolve_amp', 'cpu_has_native_bf16',
           'Float32DegenerateConvs', 'StopSignals', 'Preempted', 'PREEMPTED_EXIT_CODE', 'stop_requested']

PREEMPTED_EXIT_CODE = 75  # what the command line exits with after a SIGTERM / SIGUSR1 checkpoint (EX_TEMPFAIL: requeue)

_MASK = (1 << 63) - 1


def step_seed(seed: int, *counters: int) -> int:
    """A 63-bit seed from (run seed, counters...) by splitmix64-style mixing: the counter-based seed of a step."""
    x = seed & _MASK
    for i, c in enumerate(counters):
        x = (x + (c + 1) * (0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019 * i)) & ((1 << 64) - 1)
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
        x ^= x >> 31
    return x & _MASK

def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without it bf16 autocast is many times slower."""
    for probe in ('_is_avx512_bf16_supported', '_is_amx_tile_supported'):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except Exception:  # noqa: BLE001 -- a private probe that changed: fall back to cpuinfo
                break
    try:
        flags = Path('/proc/cpuinfo').read_text()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags

@contextlib.contextmanager
def process_group(device: str) -> Iterator[Tuple[int, int, torch.device]]:
    """(rank, world, device) of this process. Under torchrun the process group is created on entry unless a caller
    already holds one (RepFusion holds one for both of its stages), and destroyed on leaving only by whoever created
    it; a normal exit waits for every process (process 0 may still be writing files)."""
    creates = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not dist.is_initialized()
    rank, world, dev = setup_distributed(device)
    try:
        yield rank, world, dev
        if world > 1:
            dist.barrier()
    finally:
        if creates:
            dist.destroy_process_group()

def setup_distributed(device: str) -> Tuple[int, int, torch.device]:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    use_cuda = torch.cuda.is_available() and device in ('auto', 'cuda')
    if device == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is available')
    rank, local = 0, 0
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group('nccl' if use_cuda else 'gloo')
        rank, local = dist.get_rank(), int(os.environ.get('LOCAL_RANK', '0'))
    if use_cuda:
        torch.cuda.set_device(local)
        return rank, world, torch.device('cuda', local)
    return rank, world, torch.device('cpu')

def resolve_amp(mode: str, device: torch.device) -> Optional[Dict[str, Any]]:
    """The autocast arguments of ``mode`` on ``device``. ``auto``: bf16 on a GPU and on a CPU with native bf16
    (AVX512-BF16 or AMX), float32 elsewhere; ``bf16``: bf16 wherever asked (on a CPU without native bf16 it is correct
    but many times slower: 12x measured, so a warning says so); ``off``: float32."""
    if mode == 'off':
        return None
    if device.type == 'cuda':
        return dict(device_type='cuda', dtype=torch.bfloat16)
    if cpu_has_native_bf16():
        return dict(device_type='cpu', dtype=torch.bfloat16)
    if mode == 'bf16':
        warnings.warn('--amp bf16: this CPU has no native bf16 (AVX512-BF16 or AMX); bf16 autocast is emulated and '
                      'runs many times slower than float32 (--amp auto picks float32 here)', stacklevel=2)
        return dict(device_type='cpu', dtype=torch.bfloat16)
    return None

def _set_cpu_autocast(enabled: bool) -> None:
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4: the device-type API
        torch.set_autocast_enabled('cpu', enabled)
    else:  # torch < 2.4
        torch.set_autocast_cpu_enabled(enabled)

def _cpu_autocast_enabled() -> bool:
    return torch.is_autocast_enabled('cpu') if hasattr(torch, 'get_autocast_dtype') else torch.is_autocast_cpu_enabled()

class Float32DegenerateConvs:
    """Run, under CPU bf16 autocast, every convolution whose input is smaller than its stride in float32.

    The cause it works around: oneDNN's bf16 weight-gradient kernel (PyTorch 2.14's CPU convolution) leaves the taps
    of the weight gradient that see only padding unwritten when an input side is smaller than the stride (a 3x3,
    stride-2 convolution on a 1x1 map: timm's ImageNet-stem ResNets on 16-32 px images, whose last stage is 1x1).
    Those entries hold whatever the allocator had (1e29 was seen): training is then neither reproducible nor right.
    float32 (and bf16 on larger maps) computes them correctly. The guard costs a shape check per convolution call;
    the convolutions it moves to float32 are the ones on 1x1 maps, the cheapest of the network. ``found`` names them.
    """

    def __init__(self, module: nn.Module) -> None:
        self.found: List[str] = []
        self._handles = []
        for name, m in module.named_modules():
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
                self._handles.append(m.register_forward_pre_hook(
                    lambda mod, args, _name=name: self._before(_name, mod, args)))
                self._handles.append(m.register_forward_hook(self._after))

    @staticmethod
    def degenerate(conv: nn.Module, x: torch.Tensor) -> bool:
        """Whether an input side is smaller than the convolution's stride while it pads."""
        stride = conv.stride
        pads = conv.padding != 'valid' and (isinstance(conv.padding, str) or any(p > 0 for p in conv.padding))
        return bool(pads) and any(n < s for n, s in zip(x.shape[-len(stride):], stride))

    def _before(self, name: str, conv: nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
        x = args[0]
        if not (_cpu_autocast_enabled() and torch.is_tensor(x) and self.degenerate(conv, x)):
            return None
        if name not in self.found:
            self.found.append(name)
            warnings.warn(f'{name or type(conv).__name__}: a stride-{tuple(conv.stride)} convolution on a '
                          f'{tuple(x.shape[2:])} input runs in float32 under CPU bf16 autocast (oneDNN leaves part of '
                          f'its bf16 weight gradient unwritten on inputs smaller than the stride)', stacklevel=2)
        conv._ldae_float32 = True
        _set_cpu_autocast(False)
        return (x.float(), *args[1:])

    @staticmethod
    def _after(conv: nn.Module, args: Tuple[Any, ...], out: Any) -> None:
        if conv.__dict__.pop('_ldae_float32', False):
            _set_cpu_autocast(True)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

class Preempted(Exception):
    """A run stopped by SIGTERM or SIGUSR1 after writing its checkpoint at the step reached; ``--resume`` continues
    it. The command line exits with ``PREEMPTED_EXIT_CODE`` (75), which a requeue script can act on."""

    def __init__(self, step: int, path: Path, signal_name: str) -> None:
        super().__init__(f'{signal_name}: stopped at step {step} with its checkpoint {path}; continue with --resume')
        self.step, self.path = step, path

class StopSignals:
    """SIGTERM and SIGUSR1 (a scheduler's notice before preemption) set a flag the loop reads at step boundaries;
    the previous handlers are restored on leaving. Outside the main thread nothing is installed."""

    NAMES = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> 'StopSignals':
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)

def stop_requested(signals: StopSignals, world: int, step: int, every: int, device: torch.device) -> bool:
    """Whether to stop at this step boundary: at once in one process; under torchrun every ``every`` steps (the
    processes agree by an all-reduce, which waits on the device, so it runs at the non-finite check's cadence)."""
    if world == 1:
        return signals.received is not None
    if step % every:
        return False
    flag = torch.tensor([1.0 if signals.received else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)
