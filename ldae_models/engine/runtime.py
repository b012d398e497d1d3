"""Where a run executes: its device and processes (one process, torchrun, or one process per task under srun), its
precision, and the signals that stop it.

Stopping: SIGTERM and SIGUSR1 (a scheduler's notice) set a flag (``StopSignals``, installed when a run starts, before
its data is listed); the loop checkpoints at the next step boundary and raises ``Preempted`` (exit status 75).
Several processes must stop at the same step: ``StopCheck`` has them agree by one all-reduce every ``every_s``
seconds, at a step all of them compute from the slowest one's step time, so a stop costs at most about ``every_s``
plus the checkpoint, whatever the model's step time, and no step waits on the host in between.
"""
import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ['resolve_device', 'process_group', 'setup_distributed', 'resolve_amp', 'cpu_has_native_bf16',
           'Float32DegenerateConvs', 'StopSignals', 'StopCheck', 'Preempted', 'PREEMPTED_EXIT_CODE', 'STOP_SIGNALS',
           'HostSyncCounter', 'HOST_SYNC_OPS']

PREEMPTED_EXIT_CODE = 75  # what the command line exits with after a SIGTERM / SIGUSR1 checkpoint (EX_TEMPFAIL: requeue)
STOP_SIGNALS = ('SIGTERM', 'SIGUSR1')  # a scheduler's notice: the run checkpoints at the next step and stops


def resolve_device(name: str) -> torch.device:
    """``'auto'`` (the local GPU if any), ``'cpu'`` or ``'cuda'`` (refused, in words, without a GPU)."""
    if name not in ('auto', 'cpu', 'cuda'):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is visible to this process (check the allocation: '
                         'CUDA_VISIBLE_DEVICES, sbatch --gpus-per-node)')
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


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
    """(rank, world, device) of this process. With several processes (``WORLD_SIZE`` > 1) the process group is
    created on entry unless a caller already holds one, and destroyed on leaving only by whoever created it; a normal
    exit waits for every process (process 0 may still be writing files)."""
    creates = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not dist.is_initialized()
    rank, world, dev = setup_distributed(device)
    try:
        yield rank, world, dev
        if world > 1:
            dist.barrier()
    finally:
        if creates and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str) -> Tuple[int, int, torch.device]:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and bind this process to its GPU (``LOCAL_RANK``) before
    any collective. A process without the GPU it was told to use is refused in one line naming it."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    dev = resolve_device(device)
    local = int(os.environ.get('LOCAL_RANK', '0'))
    if dev.type == 'cuda':
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(f'process {local} of this machine needs GPU {local}, but {count} GPU(s) are visible: '
                             f'start one process per GPU (NPROC_PER_NODE, srun --ntasks-per-node) or ask for more GPUs')
        torch.cuda.set_device(local)
        dev = torch.device('cuda', local)
    rank = 0
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
        rank = dist.get_rank()
    return rank, world, dev


def resolve_amp(mode: str, device: torch.device) -> Optional[Dict[str, Any]]:
    """The autocast arguments of ``mode`` on ``device``. ``auto``: bf16 on a GPU that has it (compute capability 8.0
    and later: ``torch.cuda.is_bf16_supported()``) and on a CPU with native bf16 (AVX512-BF16 or AMX), float32
    elsewhere; ``bf16``: bf16 wherever asked (on a CPU without native bf16 it is correct
    but many times slower: 12x measured, so a warning says so); ``off``: float32."""
    if mode == 'off':
        return None
    if device.type == 'cuda':
        if torch.cuda.is_bf16_supported():
            return dict(device_type='cuda', dtype=torch.bfloat16)
        if mode == 'bf16':
            raise ValueError(f'--amp bf16: {torch.cuda.get_device_name(device)} has no bf16 (compute capability '
                             f'below 8.0); use --amp off')
        warnings.warn(f'--amp auto: {torch.cuda.get_device_name(device)} has no bf16; the run computes in float32',
                      stacklevel=2)
        return None
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

class StopSignals:
    """SIGTERM and SIGUSR1 set a flag the loop reads at step boundaries; the previous handlers are restored on
    leaving. Outside the main thread nothing is installed."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> 'StopSignals':
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)


class StopCheck:
    """Whether to stop at a step boundary (see the module docstring): in one process, whenever a signal came; with
    several, at agreed steps about ``every_s`` seconds apart."""

    def __init__(self, signals: StopSignals, world: int, device: torch.device, every_s: float) -> None:
        self.signals, self.world, self.device, self.every_s = signals, world, device, every_s
        self.next_step: Optional[int] = None   # the next agreed check (None: the first step boundary)
        self.mark = (0, time.monotonic())      # (step, time) of the last check

    def now(self, step: int) -> bool:
        """Agree now (every process calls it at this step): whether any process received a stop signal."""
        if self.world == 1:
            return self.signals.received is not None
        last_step, last_t = self.mark
        now = time.monotonic()
        per_step = (now - last_t) / max(1, step - last_step)
        t = torch.tensor([1.0 if self.signals.received else 0.0, per_step], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        stop, slowest = t.tolist()
        self.next_step = step + max(1, int(self.every_s / max(slowest, 1e-6)))
        self.mark = (step, now)
        return stop > 0

    def __call__(self, step: int) -> bool:
        """At a step boundary: whether to stop here (several processes: only at the agreed steps)."""
        if self.world == 1:
            return self.signals.received is not None
        if self.next_step is None:  # the first boundary starts the clock
            self.next_step, self.mark = step + 1, (step, time.monotonic())
            return False
        return self.now(step) if step >= self.next_step else False


class Preempted(Exception):
    """A run stopped by SIGTERM or SIGUSR1 after writing its checkpoint at the step reached; ``--resume`` continues
    it. The command line exits with ``PREEMPTED_EXIT_CODE`` (75), which a requeue script can act on."""

    def __init__(self, step: int, path: Path, signal_name: str) -> None:
        super().__init__(f'{signal_name}: stopped at step {step} with its checkpoint {path}; continue with --resume')
        self.step, self.path = step, path


# ops that make a GPU wait for the host (a value read: .item(), bool(), data-dependent shapes) or that copy pageable
# host data to it (a tensor made from Python data: torch.tensor)
HOST_SYNC_OPS = frozenset({'_local_scalar_dense', 'nonzero', 'masked_select', 'equal', 'is_nonzero', 'unique',
                           '_unique2', 'repeat_interleave', 'lift_fresh', 'lift_fresh_copy'})


class HostSyncCounter:
    """Counts, by ``label`` (set it as the work goes: e.g. the step), the ops of ``HOST_SYNC_OPS`` run inside the
    ``with`` block, seen by a ``TorchDispatchMode``; ``ignore(tensor)`` leaves out reads of tensors that live on the
    host on a GPU too (e.g. a non-capturable optimizer's step counters). A diagnostic: what the tests assert and
    ``benchmarks/bench_host_syncs.py`` reports."""

    def __init__(self, ignore: Any = lambda tensor: False) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        self.label: Any = None
        self.counts: Dict[Any, List[str]] = {}
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name.split('::')[-1]
                if name in HOST_SYNC_OPS and not (args and torch.is_tensor(args[0]) and ignore(args[0])):
                    counter.counts.setdefault(counter.label, []).append(name)
                return func(*args, **(kwargs or {}))
        self._mode = _Mode()

    def __enter__(self) -> 'HostSyncCounter':
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
