"""Feeding a device: batches of a split, in memory or streamed, the same images either way.

- ``stream(split, index_batches, size, device)``: the streaming path. DataLoader workers read what the data set stores
  (file bytes); JPEGs are decoded in batches where the batch is used (``torchvision.io.decode_jpeg`` on the GPU), or
  in the workers when the batch is used on the CPU. Workers default from the core count (``default_workers``), are
  pinned and leave SIGTERM / SIGUSR1 to the main process. Memory is flat in the split's size: a few batches in flight.
- ``batches(source, index_batches, ...)``: the one iterator the training loop, the PCA fit, feature extraction and
  both probes use; ``source`` is a decoded ``ImageData`` (batches are cut from it where it lives) or a ``Split``
  (streamed). Both give uint8 (B, 3, S, S) center squares (``decode``): one crop semantics.
- ``in_memory_data(...)``: the in-memory path of training, chosen by bytes against free memory
  (``fits_in_memory``) and decoded once per machine into one file-backed tensor the local processes share.
- ``augment`` draws crops and flips on the device from given uniforms, ``normalize`` maps uint8 to the model's range.
"""
import math
import os
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .decode import decode_batch
from .splits import ImageData, Split

__all__ = ['AUGMENTATIONS', 'STOP_SIGNALS', 'augment', 'normalize', 'stream', 'batches', 'sequential', 'StepBatches',
           'training_source',
           'default_workers', 'fits_in_memory', 'in_memory_data']

AUGMENTATIONS = ('center', 'flip', 'rrc', 'pad_crop')
STOP_SIGNALS = ('SIGTERM', 'SIGUSR1')  # a scheduler's notice: the main process checkpoints, workers ignore it
IN_MEMORY_FRACTION = 0.25  # the decoded data may take this share of the free host (and device) memory


def normalize(images: torch.Tensor, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)
              ) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std`` on the images' device (default: [-1, 1])."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def augment(images: torch.Tensor, mode: str, generator: Optional[torch.Generator] = None,
            scale: Tuple[float, float] = (0.2, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
            u: Optional[torch.Tensor] = None, pad: int = 4, fill: float = -1.0) -> torch.Tensor:
    """Batched augmentation of float images (B, C, H, W), the random draws from ``generator`` (or given: ``u``, (B, 5)
    uniforms in [0, 1), so that a rank can take its slice of draws made for a whole global batch).

    ``'center'``: none (the images are the center square already: the paper's default). ``'flip'``: a horizontal
    flip with probability 1/2 (DiT's). ``'rrc'``: a random resized crop of the center square (area fraction in
    ``scale``, aspect ratio in ``ratio``, log-uniform; MAE's ranges) back to H x W with bilinear sampling, and the
    flip. ``'pad_crop'``: the CIFAR crop: the image padded by ``pad`` pixels of ``fill`` (black of [-1, 1] images),
    an H x W window at a uniform integer offset, and the flip (exact: no resampling).
    """
    if mode == 'center':
        return images
    if mode not in AUGMENTATIONS:
        raise ValueError(f'augmentation must be one of {AUGMENTATIONS}, got {mode!r}')
    B = images.shape[0]
    if u is None:
        dev = generator.device if generator is not None else images.device
        u = torch.rand(B, 5, generator=generator, device=dev)
    u = u.to(images.device)
    flip = u[:, 4] < 0.5
    if mode == 'flip':
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    if mode == 'pad_crop':
        H, W = images.shape[-2:]
        dy = (u[:, 2] * (2 * pad + 1)).long().clamp(max=2 * pad)  # the window's corner in the padded image
        dx = (u[:, 3] * (2 * pad + 1)).long().clamp(max=2 * pad)
        padded = F.pad(images, (pad, pad, pad, pad), value=fill)
        rows = dy[:, None] + torch.arange(H, device=images.device)
        cols = dx[:, None] + torch.arange(W, device=images.device)
        cols = torch.where(flip[:, None], cols.flip(-1), cols)
        out = padded[torch.arange(B, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)   # crop width and height as fractions of the image
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)       # crop centre in [-1, 1] coordinates, the crop inside the image
    cy = (1 - h) * (2 * u[:, 3] - 1)
    theta = torch.zeros(B, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = w * torch.where(flip, -1.0, 1.0), cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode='bilinear', padding_mode='reflection', align_corners=False)


# -- streaming ------------------------------------------------------------------------------------------------------

def default_workers(processes_per_machine: Optional[int] = None) -> int:
    """DataLoader workers per process: the cores this process may use, shared by the processes of the machine
    (``LOCAL_WORLD_SIZE`` under torchrun), one left to the main process, at most 16."""
    local = processes_per_machine or int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, min(16, cores // max(1, local) - 1))


class _Items(torch.utils.data.Dataset):
    """What a worker reads: image i's stored bytes (or array) and its position; ``_Collate`` decodes or not."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.item(i), i


class _Collate:
    """Stack a batch: decoded in the worker (``size`` given: the batch is used on the CPU) or left as bytes."""

    def __init__(self, split: Split, size: Optional[int], decode: bool) -> None:
        self.split, self.size, self.decode = split, size, decode

    def __call__(self, batch):
        items, idx = [b[0] for b in batch], [b[1] for b in batch]
        labels = self.split.labels[torch.tensor(idx, dtype=torch.long)]
        if self.decode:
            return decode_batch(items, self.size, 'cpu', [self.split.name(i) for i in idx]), labels, idx
        return items, labels, idx


class _Batches(torch.utils.data.Sampler):
    def __init__(self, index_batches: Iterable[Sequence[int]], count: Optional[int]) -> None:
        self.index_batches, self.count = index_batches, count

    def __iter__(self) -> Iterator[Sequence[int]]:
        return iter(self.index_batches)

    def __len__(self) -> int:  # DataLoader's length (progress bars); a generator of unknown length reports 0
        return self.count or 0


def _ignore_stop(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 to the main process, which checkpoints and then stops them."""
    import signal
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def stream(split: Split, index_batches: Iterable[Sequence[int]], size: Optional[int],
           device: Union[str, torch.device] = 'cpu', workers: int = -1, count: Optional[int] = None
           ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images (B, 3, size, size), labels) on ``device`` for each list of positions in ``index_batches``, in
    order. Workers (``-1``: ``default_workers()``) read bytes; on a GPU the JPEGs of a batch are decoded there in one
    call, on a CPU in the worker. ``count`` (the number of batches, if known) is the loader's length."""
    device = torch.device(device)
    workers = default_workers() if workers < 0 else workers
    if count is None and hasattr(index_batches, '__len__'):
        count = len(index_batches)
    decode_in_worker = device.type == 'cpu'
    collate = _Collate(split, size, decode_in_worker)
    if workers == 0:
        loader: Iterable = (collate([(split.item(i), i) for i in idx]) for idx in index_batches)
    else:
        loader = torch.utils.data.DataLoader(
            _Items(split), batch_sampler=_Batches(index_batches, count), num_workers=workers, collate_fn=collate,
            pin_memory=device.type == 'cuda', worker_init_fn=_ignore_stop, prefetch_factor=4)
    for items, labels, idx in loader:
        if decode_in_worker:
            images = items
        else:
            images = decode_batch(items, size, device, [split.name(i) for i in idx])
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def sequential(n: int, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """Positions 0..n-1 in batches of ``batch_size``; with ``world`` processes, process ``rank`` takes every
    ``world``-th batch (evaluation: each image once over all processes)."""
    for b, lo in enumerate(range(0, n, batch_size)):
        if b % world == rank:
            yield torch.arange(lo, min(n, lo + batch_size))


def batches(source: Union[ImageData, Split], index_batches: Iterable[Sequence[int]], size: Optional[int] = None,
            device: Union[str, torch.device] = 'cpu', workers: int = -1, count: Optional[int] = None
            ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) on ``device`` for each batch of positions: cut from a decoded ``ImageData`` where it
    lives, or ``stream``ed from a ``Split`` (decoded and cropped to ``size``)."""
    device = torch.device(device)
    if isinstance(source, ImageData):
        for idx in index_batches:
            idx = torch.as_tensor(idx, device=source.images.device)
            yield (source.images[idx].to(device, non_blocking=True),
                   source.labels[idx.to(source.labels.device)].to(device, non_blocking=True))
        return
    yield from stream(source, index_batches, size, device, workers, count)


# -- the in-memory path of training ---------------------------------------------------------------------------------

def _host_available() -> int:
    try:
        for line in open('/proc/meminfo'):
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fits_in_memory(nbytes: int, device: torch.device) -> Tuple[bool, str]:
    """Whether ``nbytes`` of decoded images may live in memory: at most ``IN_MEMORY_FRACTION`` of the free host
    memory (one copy per machine) and of the device's free memory (one copy per GPU). Returns (answer, reason)."""
    host = _host_available()
    free = [('host', host)] if host else []
    if device.type == 'cuda':
        free.append((f'{device}', torch.cuda.mem_get_info(device)[0]))
    for where, avail in free:
        if nbytes > IN_MEMORY_FRACTION * avail:
            return False, f'{nbytes / 2**30:.1f} GiB decoded > {IN_MEMORY_FRACTION:.0%} of {where} free ' \
                          f'({avail / 2**30:.1f} GiB)'
    return True, f'{nbytes / 2**30:.2f} GiB decoded fits'


def in_memory_data(split: Split, size: int, device: torch.device, local_rank: int = 0, local_world: int = 1,
                   barrier: Callable[[], None] = lambda: None, progress: bool = True, key: str = '',
                   workers: int = -1) -> ImageData:
    """The split decoded once per machine (in ``workers`` DataLoader workers) and moved to ``device``: with several
    local processes, local process 0 decodes into a file under /dev/shm that the others map (``barrier`` waits for
    it), then it is removed."""
    shm = '/dev/shm'
    workers = default_workers(1) if workers < 0 else workers  # the others wait: process 0 may use every core
    if local_world == 1 or not os.path.isdir(shm):
        return split.decode(size, progress=progress and local_rank == 0, workers=workers).to(device)
    import hashlib
    tag = hashlib.sha1(repr((key, split.where, len(split), size)).encode()).hexdigest()[:12]
    path = os.path.join(shm, f'ldae-{os.getppid()}-{tag}.u8')  # torchrun's local processes share their parent
    if local_rank == 0:
        data = split.decode(size, progress=progress, shared_file=path, workers=workers)
    barrier()
    if local_rank != 0:
        images = torch.from_file(path, shared=True, size=split.nbytes(size), dtype=torch.uint8)
        data = ImageData(images.view(len(split), 3, size, size), split.labels.clone(), split.classes)
    data = data.to(device)
    barrier()
    if local_rank == 0:
        os.unlink(path)
    return data


def training_source(split: Split, size: int, in_memory: str, device: torch.device, workers: int = -1,
                    barrier: Callable[[], None] = lambda: None, progress: bool = True, key: str = '',
                    agree: Callable[[bool], bool] = lambda fits: fits) -> Tuple[Union[ImageData, Split], str]:
    """What a training run reads: the split decoded in device memory (``in_memory`` 'yes', or 'auto' when
    ``fits_in_memory``; ``agree`` makes every process take the same answer), else the split itself, streamed.
    Returns (source, the reason, for the log)."""
    if in_memory == 'no':
        return split, 'streamed (--in-memory no)'
    fits, why = fits_in_memory(split.nbytes(size), device)
    fits = agree(fits)
    if in_memory == 'auto' and not fits:
        return split, f'streamed: {why}'
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    local_world = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    data = in_memory_data(split, size, device, local_rank, local_world, barrier, progress, key, workers)
    return data, f'in memory: {why}' if fits else 'in memory (--in-memory yes)'


class StepBatches:
    """This rank's micro-batches of uint8 images, step after step, from ``start_step``: the training loop's sampler.

    Step s of epoch e takes the slice [s G, (s + 1) G) of a permutation of the data set seeded by ``perm_seed(e)``
    (one permutation per epoch), G the global batch; rank r takes the r-th of ``world`` equal parts and splits it
    into ``accum`` micro-batches. Each micro-batch comes with its step and its offset in the global batch, where its
    crops, t and noise are read from the step's global draws; a resumed run reads exactly what it would have read.
    """

    def __init__(self, source: Union[ImageData, Split], size: int, batch_size: int, accum: int, world: int,
                 rank: int, start_step: int, total_steps: int, perm_seed: Callable[[int], int],
                 device: torch.device, workers: int = -1) -> None:
        if batch_size % (world * accum):
            raise ValueError(f'--batch-size {batch_size} must be divisible by processes x accumulation '
                             f'({world} x {accum})')
        self.source, self.size, self.n = source, size, len(source)
        self.batch_size, self.accum, self.world, self.rank = batch_size, accum, world, rank
        self.steps_per_epoch = self.n // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f'--batch-size {batch_size} is larger than the data set ({self.n} images)')
        self.start_step, self.total_steps, self.perm_seed = start_step, total_steps, perm_seed
        self.device, self.workers = device, workers
        self.part = batch_size // world
        self.micro = self.part // accum

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.perm_seed(epoch)))

    def keys(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """(step, offset in the global batch, positions) of each micro-batch of this rank."""
        perm, perm_epoch = None, -1
        where = self.source.images.device if isinstance(self.source, ImageData) else torch.device('cpu')
        for step in range(self.start_step, self.total_steps):
            epoch, s = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:  # one permutation per epoch (a 1.28M-index permutation costs ~60 ms)
                perm, perm_epoch = self.permutation(epoch).to(where), epoch
            for a in range(self.accum):
                offset = self.rank * self.part + a * self.micro
                lo = s * self.batch_size + offset
                yield step, offset, perm[lo:lo + self.micro]

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(step, offset, uint8 images and their labels on the device)."""
        count = (self.total_steps - self.start_step) * self.accum
        data = batches(self.source, (idx for _, _, idx in self.keys()), self.size, self.device, self.workers, count)
        for (step, offset, _), (images, labels) in zip(self.keys(), data):
            yield step, offset, images, labels
