"""Feeding a device: batches of a split, in memory or streamed, the same images either way.

- ``stream(split, positions, size, device)``: the streaming path. DataLoader workers read what the data set stores
  (file bytes, sent back as one ``Packed`` tensor per batch: one file descriptor, not one per image); JPEGs are
  decoded in batches where the batch is used (``decode_jpeg`` on the GPU), or in the workers when it is used on the
  CPU. Workers default from the cores this process may use (``default_workers``), are pinned, never outlive the main
  process (they are stopped when the stream ends, however it ends, and killed if the main process dies), and ignore
  the stop signals the main process handles itself (it checkpoints, then stops them). Memory is flat in the split's
  size: a few batches in flight.
- ``read_batches(source, positions, ...)``: the one iterator the training loop, the PCA fit, feature extraction and
  the probes use; ``source`` is a decoded ``ImageData`` (batches are cut from it where it lives) or a ``Split``
  (streamed). Both give uint8 (B, 3, S, S) center squares (``decode``): one crop semantics.
- ``decode_split``: a whole split decoded once into one preallocated tensor (``load_split``); ``training_data``: what a
  training run reads, in memory (decoded once per machine into a file the local processes share) when it fits, by
  bytes against the free host, device and /dev/shm memory, else streamed.

An image that cannot be read or decoded: ``bad='raise'`` (default) stops at once with one line naming it;
``'drop'`` leaves it out (evaluation: features of the readable images, their labels with them); ``'fill'`` puts
another image of its batch (and its label) in its place (training: the global batch keeps its size). ``on_bad`` is
told each one (``--skip-bad-images``: logged and recorded in the output folder).
"""
import os
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..progress import Progress
from .decode import decode_readable, pack
from .splits import ArraySplit, ImageData, Split, open_split

__all__ = ['stream', 'read_batches', 'sequential', 'decode_split', 'load_split', 'training_data', 'fits_in_memory',
           'default_workers', 'BAD_POLICIES']

BAD_POLICIES = ('raise', 'drop', 'fill')
IN_MEMORY_FRACTION = 0.25  # the decoded data may take this share of the free host (and device) memory
OnBad = Optional[Callable[[List[str]], None]]


def default_workers(processes_per_machine: Optional[int] = None) -> int:
    """DataLoader workers per process: the cores this process may use, one left to the main process, at most 16. A
    process bound to its own cores (``srun --cpus-per-task``) uses them all; one that sees the whole machine shares
    it with the other processes of the machine (``LOCAL_WORLD_SIZE`` under torchrun)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    local = processes_per_machine or int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    share = 1 if cores < (os.cpu_count() or cores) else max(1, local)
    return max(0, min(16, cores // share - 1))


class _Items(torch.utils.data.Dataset):
    """What a worker reads: image i's stored bytes (or array), or why it cannot be read (a string)."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            return self.split.item(i), i
        except ValueError as e:  # an unreadable file: named, decided by the main process
            return str(e), i


class _Collate:
    """A batch as the main process receives it: (images or ``Packed`` bytes, labels, positions, their names, one line
    per unreadable item). Decoded here when ``size`` is given (the batch is used on the CPU)."""

    def __init__(self, split: Split, size: Optional[int], decode: bool) -> None:
        self.split, self.size, self.decode = split, size, decode

    def __call__(self, batch):
        idx = [i for _, i in batch]
        bad = [item for item, _ in batch if isinstance(item, str)]
        ok = [(item, i) for item, i in batch if not isinstance(item, str)]
        items, pos = [item for item, _ in ok], [i for _, i in ok]
        names = [self.split.name(i) for i in pos]
        if self.decode:
            images, kept, more = decode_readable(items, self.size, 'cpu', names)
            pos, bad = [pos[k] for k in kept], bad + more
            return images, self.split.labels[torch.tensor(pos, dtype=torch.long)], pos, None, bad, idx
        return pack(items), self.split.labels[torch.tensor(pos, dtype=torch.long)], pos, names, bad, idx


class _PositionLists(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: the given lists of positions, in order."""

    def __init__(self, lists: Iterable[Sequence[int]], count: Optional[int]) -> None:
        self.lists, self.count = lists, count

    def __iter__(self) -> Iterator[Sequence[int]]:
        return iter(self.lists)

    def __len__(self) -> int:  # the DataLoader's length; a generator of unknown length reports 0
        return self.count or 0


class _WorkerInit:
    """A worker's start: ignore the signals the main process handles itself (a scheduler's SIGTERM reaches every
    process; the main process checkpoints, then stops its workers), and die with the main process (Linux)."""

    def __init__(self, ignore: Sequence[int]) -> None:
        self.ignore = list(ignore)

    def __call__(self, worker_id: int) -> None:
        import signal
        for sig in self.ignore:
            signal.signal(sig, signal.SIG_IGN)
        _die_with_parent()


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); nothing elsewhere."""
    import sys
    if not sys.platform.startswith('linux'):
        return
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _handled_signals() -> List[int]:
    """The stop signals this process handles in Python now (a training run's), which its workers leave to it."""
    import signal
    out = []
    for name in ('SIGTERM', 'SIGUSR1', 'SIGINT'):
        sig = getattr(signal, name, None)
        if sig is not None and callable(signal.getsignal(sig)) and signal.getsignal(sig) is not signal.default_int_handler:
            out.append(sig)
    return out


def _stop_workers(it: object) -> None:
    """Stop a DataLoader iterator's workers now: its own shutdown (they exit when told), then SIGKILL for any that
    did not (they ignore SIGTERM, which is what the DataLoader's own fallback sends)."""
    shutdown = getattr(it, '_shutdown_workers', None)
    if shutdown is not None:
        shutdown()
    for w in getattr(it, '_workers', []):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def _fill(images: torch.Tensor, labels: torch.Tensor, kept: List[int], n: int, where: str
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``n`` rows from its ``kept`` readable rows: each unreadable row takes the first readable one."""
    if not kept:
        raise ValueError(f'every image of a batch of {n} in {where} is unreadable: check the data '
                         f'(ldae-models check-data lists them)')
    rank = {p: r for r, p in enumerate(kept)}
    take = torch.tensor([rank.get(i, 0) for i in range(n)], dtype=torch.long)
    return images[take.to(images.device)], labels[take.to(labels.device)]


def stream(split: Split, positions: Iterable[Sequence[int]], size: Optional[int],
           device: Union[str, torch.device] = 'cpu', workers: int = -1, count: Optional[int] = None,
           bad: str = 'raise', on_bad: OnBad = None, decode_on: Optional[str] = None
           ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images (B, 3, size, size), labels) on ``device`` for each list of positions, in order.

    Workers (``-1``: ``default_workers()``; 0: in this process) read bytes; ``decode_on`` 'worker' (default on a CPU)
    or 'device' (default on a GPU: the batch's JPEGs in one nvJPEG call). ``count`` (the number of lists, if known)
    is the loader's length. ``bad`` and ``on_bad``: see the module docstring.
    """
    if bad not in BAD_POLICIES:
        raise ValueError(f'bad must be one of {BAD_POLICIES}, got {bad!r}')
    device = torch.device(device)
    workers = default_workers() if workers < 0 else workers
    if count is None and hasattr(positions, '__len__'):
        count = len(positions)
    in_worker = (decode_on or ('worker' if device.type == 'cpu' else 'device')) == 'worker'
    collate = _Collate(split, size, in_worker)
    if workers == 0:
        loader: Iterable = (collate([_Items(split)[i] for i in idx]) for idx in positions)
    else:
        loader = torch.utils.data.DataLoader(
            _Items(split), batch_sampler=_PositionLists(positions, count), num_workers=workers, collate_fn=collate,
            pin_memory=device.type == 'cuda', worker_init_fn=_WorkerInit(_handled_signals()), prefetch_factor=4)
    it = iter(loader)
    failure = None
    try:
        for items, labels, pos, names, lines, idx in it:
            if in_worker:
                images, kept = items, list(range(len(pos)))
            else:
                images, kept, more = decode_readable(items, size, device, names)
                lines = lines + more
            if lines:
                if bad == 'raise':
                    failure = lines[0] + (f' (and {len(lines) - 1} more in this batch)' if len(lines) > 1 else '')
                    break
                if on_bad is not None:
                    on_bad(lines)
            kept_pos = [pos[k] for k in kept]
            labels = labels[torch.tensor(kept, dtype=torch.long)] if not in_worker else labels
            if bad == 'fill' and len(kept_pos) < len(idx):
                where = {p: r for r, p in enumerate(idx)}
                images, labels = _fill(images, labels, [where[p] for p in kept_pos], len(idx), split.where)
            cuda = device.type == 'cuda'
            yield images.to(device, non_blocking=cuda), labels.to(device, non_blocking=cuda)
    finally:
        _stop_workers(it)
        del it
    if failure is not None:  # raised here, outside the DataLoader's frames: nothing keeps its workers alive
        raise ValueError(f'{failure}; --skip-bad-images skips unreadable images, ldae-models check-data lists them')


def sequential(n: int, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """Positions 0..n-1 in batches of ``batch_size``; with ``world`` processes, process ``rank`` takes every
    ``world``-th batch (evaluation: each image once over all processes)."""
    for b, lo in enumerate(range(0, n, batch_size)):
        if b % world == rank:
            yield torch.arange(lo, min(n, lo + batch_size))


def read_batches(source: Union[ImageData, Split], positions: Iterable[Sequence[int]], size: Optional[int] = None,
                 device: Union[str, torch.device] = 'cpu', workers: int = -1, count: Optional[int] = None,
                 bad: str = 'raise', on_bad: OnBad = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) on ``device`` for each list of positions: cut from a decoded ``ImageData`` where it
    lives, or ``stream``ed from a ``Split`` (decoded and cropped to ``size``). A copy to the GPU is non-blocking
    (from pinned memory); a copy to the host always blocks (its bytes are read next)."""
    device = torch.device(device)
    if isinstance(source, ImageData):
        cuda = device.type == 'cuda'
        for idx in positions:
            idx = torch.as_tensor(idx, device=source.images.device)
            yield (source.images[idx].to(device, non_blocking=cuda),
                   source.labels[idx.to(source.labels.device)].to(device, non_blocking=cuda))
        return
    yield from stream(source, positions, size, device, workers, count, bad, on_bad)


# -- a whole split in memory ----------------------------------------------------------------------------------------

def decode_split(split: Split, size: Optional[int], progress: bool = False, shared_file: Optional[str] = None,
                 batch: int = 256, workers: int = 0, bad: str = 'raise', on_bad: OnBad = None) -> ImageData:
    """Every image decoded once (``decode_batch`` on the CPU, ``batch`` at a time, in ``workers`` DataLoader workers)
    into one preallocated uint8 tensor (N, 3, size, size); with ``shared_file``, a file-backed tensor (under
    /dev/shm) that the other processes of the machine map instead of decoding again. Arrays already of ``size`` are
    taken as they are. ``bad='drop'`` leaves unreadable images out (fewer rows), ``'fill'`` fills their rows."""
    if isinstance(split, ArraySplit) and shared_file is None:
        stored = split.as_images(size)
        if stored is not None:
            return stored
    n = len(split)
    if bad == 'drop' and shared_file:
        raise ValueError("a shared in-memory copy keeps every row: use bad='fill'")
    h, side = _decoded_shape(split, size)
    if shared_file:
        images = torch.from_file(shared_file, shared=True, size=n * 3 * h * side, dtype=torch.uint8)
        images = images.view(n, 3, h, side)
    else:
        images = torch.empty(n, 3, h, side, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    lo = 0
    with Progress(n, f'decoding {split.where}', enabled=progress) as bar:
        for chunk, y in stream(split, sequential(n, batch), size, 'cpu', workers, -(-n // batch), bad, on_bad):
            images[lo:lo + len(chunk)] = chunk
            labels[lo:lo + len(chunk)] = y
            lo += len(chunk)
            bar.update(len(chunk))
    if shared_file:  # the labels travel with the images (a filled row carries its image's label)
        torch.from_file(shared_file + '.labels', shared=True, size=n, dtype=torch.int64).copy_(labels)
    return ImageData(images[:lo], labels[:lo], split.classes)


def _decoded_shape(split: Split, size: Optional[int]) -> Tuple[int, int]:
    """(H, W) of the split's images once decoded: (size, size), or the first readable image's without a size."""
    if size is not None or not len(split):
        return size or 0, size or 0
    for images, _ in stream(split, [[i] for i in range(min(len(split), 16))], None, 'cpu', 0, bad='drop'):
        return images.shape[-2], images.shape[-1]
    next(stream(split, [[0]], None, 'cpu', 0))  # none readable: raises, naming the first
    raise AssertionError('unreachable')


def load_split(dataset: str, root, split: str = 'train', img_size: Optional[int] = None, download: bool = False,
               progress: bool = True, limit: int = 0, seed: int = 0, workers: int = 0, bad: str = 'raise',
               on_bad: OnBad = None) -> ImageData:
    """Decode a split (``'train'`` or ``'test'``) of a data set into memory: ``open_split`` then ``decode_split``.

    ``img_size`` resizes (shorter side) and center-crops images of another size. ``limit`` decodes only a seeded
    random subset of that many images (``ImageData.subset``'s, chosen before any decoding: the memory and the time of
    the subset, not of the split).
    """
    return decode_split(open_split(dataset, root, split, download, limit, seed), img_size, progress,
                        workers=workers, bad=bad, on_bad=on_bad)


# -- what a training run reads ----------------------------------------------------------------------------------------

def _host_available() -> int:
    try:
        for line in open('/proc/meminfo'):
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


SHM = '/dev/shm'


def shm_free_bytes() -> int:
    """Free bytes of /dev/shm (0 where there is none): a container's default is 64 MB."""
    try:
        st = os.statvfs(SHM)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def fits_in_memory(nbytes: int, device: torch.device, shared: bool = False) -> Tuple[bool, str]:
    """Whether ``nbytes`` of decoded images may live in memory: at most ``IN_MEMORY_FRACTION`` of the free host
    memory (one copy per machine) and of the device's free memory (one copy per GPU), and, where the machine's
    processes share the copy (``shared``), within the free space of /dev/shm. Returns (answer, reason)."""
    host = _host_available()
    free = [('host', host)] if host else []
    if device.type == 'cuda':
        free.append((f'{device}', torch.cuda.mem_get_info(device)[0]))
    for where, avail in free:
        if nbytes > IN_MEMORY_FRACTION * avail:
            return False, f'{nbytes / 2**30:.1f} GiB decoded > {IN_MEMORY_FRACTION:.0%} of {where} free ' \
                          f'({avail / 2**30:.1f} GiB)'
    if shared:
        shm = shm_free_bytes()
        if nbytes > shm:
            return False, f'{nbytes / 2**30:.2f} GiB decoded > free space of {SHM} ({shm / 2**20:.0f} MiB), which ' \
                          f'the processes of a machine share it through (raise it, e.g. docker --shm-size)'
    return True, f'{nbytes / 2**30:.2f} GiB decoded fits'


def training_data(split: Split, size: int, in_memory: str, device: torch.device, workers: int = -1,
                  barrier: Callable[[], None] = lambda: None, progress: bool = True, key: str = '',
                  agree: Callable[[bool], bool] = lambda fits: fits, bad: str = 'raise', on_bad: OnBad = None
                  ) -> Tuple[Union[ImageData, Split], str]:
    """What a training run reads: the split decoded in device memory (``in_memory`` 'yes', or 'auto' when it
    ``fits_in_memory``; ``agree`` makes every process take the same answer), else the split itself, streamed.
    With several processes on a machine, local process 0 decodes into a file under /dev/shm that the others map
    (``barrier`` waits for it), then removes it. Returns (data, the reason, for the log)."""
    if in_memory == 'no':
        return split, 'streamed (--in-memory no)'
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    local_world = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    shared = local_world > 1 and os.path.isdir(SHM)
    fits, why = fits_in_memory(split.nbytes(size), device, shared)
    fits = agree(fits)
    if in_memory == 'auto' and not fits:
        return split, f'streamed: {why}'
    why = f'in memory: {why}' if fits else f'in memory (--in-memory yes; {why})'
    workers = default_workers(1) if workers < 0 else workers  # the others wait: process 0 may use every core
    fill = 'fill' if bad != 'raise' else 'raise'
    if not shared:
        return decode_split(split, size, progress and local_rank == 0, workers=workers, bad=fill,
                            on_bad=on_bad).to(device), why
    import hashlib
    tag = hashlib.sha1(repr((key, split.where, len(split), size)).encode()).hexdigest()[:12]
    path = os.path.join(SHM, f'ldae-{os.getppid()}-{tag}.u8')  # the local processes share their parent
    try:
        if local_rank == 0:
            data = decode_split(split, size, progress, shared_file=path, workers=workers, bad=fill, on_bad=on_bad)
        barrier()
        if local_rank != 0:
            images = torch.from_file(path, shared=True, size=split.nbytes(size), dtype=torch.uint8)
            labels = torch.from_file(path + '.labels', shared=True, size=len(split), dtype=torch.int64).clone()
            data = ImageData(images.view(len(split), 3, size, size), labels, split.classes)
        data = data.to(device)
        barrier()
    finally:
        if local_rank == 0:
            for f in (path, path + '.labels'):
                if os.path.exists(f):
                    os.unlink(f)
    return data, why
