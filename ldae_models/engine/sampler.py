"""The training loop's sampler: which images each micro-batch of each step of this process takes.

Step s of epoch e takes the slice [s G, (s + 1) G) of the epoch's order (``seeds.epoch_order``; G the global batch);
process r takes the r-th of ``world`` equal parts and splits it into ``accum_steps`` micro-batches. Each micro-batch
knows its rows of the global batch, where it reads its share of the step's draws (t, noise, crops): so a resumed run
reads exactly what it would have read, and N processes read what one process does.

    for step, micro_batches in StepBatches(...).read(data, start, total, ...):
        for micro in micro_batches:          # micro.images, micro.labels, micro.rows, micro.last
            ...
"""
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch

from ..data import ImageData, Split, read_batches
from .seeds import epoch_order

__all__ = ['StepBatches', 'MicroBatch', 'accumulation_steps']


def accumulation_steps(batch_size: int, world: int, micro_batch: int) -> int:
    """Micro-batches per step for a global ``batch_size`` over ``world`` processes taking ``micro_batch`` images per
    forward pass; a batch they do not divide is refused, naming the flags."""
    if micro_batch < 1 or batch_size % (world * micro_batch):
        raise ValueError(f'--micro-batch {micro_batch} does not divide the per-process batch of --batch-size '
                         f'{batch_size} over {world} process(es): choose a batch and a micro-batch that divide')
    return batch_size // (world * micro_batch)


class MicroBatch(NamedTuple):
    images: torch.Tensor   # uint8 (B, 3, S, S) on the device
    labels: torch.Tensor   # (B,)
    rows: slice            # its rows of the step's global batch (where its draws are)
    last: bool             # the step's last micro-batch of this process: gradients are then averaged (DDP)


class StepBatches:
    """The plan of this process's micro-batches over a data set of ``n`` images (see the module docstring).
    Creating it checks the batch: a data set smaller than one batch, or a batch that the processes and the
    accumulation do not divide, is refused here, before any data is read."""

    def __init__(self, n: int, batch_size: int, accum_steps: int, world: int, rank: int, seed: int) -> None:
        if batch_size % (world * accum_steps):
            raise ValueError(f'--batch-size {batch_size} must be divisible by processes x accumulation steps '
                             f'({world} x {accum_steps})')
        self.steps_per_epoch = n // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f'--batch-size {batch_size} is larger than the data set ({n} images)')
        self.n, self.batch_size, self.accum_steps = n, batch_size, accum_steps
        self.world, self.rank, self.seed = world, rank, seed
        self.micro = batch_size // (world * accum_steps)

    def plan(self, start: int, total: int, device: Union[str, torch.device] = 'cpu'
             ) -> Iterator[Tuple[int, List[Tuple[slice, torch.Tensor]]]]:
        """(step, [(rows of the global batch, positions in the data set) of each micro-batch of this process]) for
        steps ``start`` .. ``total`` - 1; positions on ``device`` (where the data lives)."""
        order, order_epoch = None, -1
        share = self.batch_size // self.world
        for step in range(start, total):
            epoch, s = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, moved to the data's device once
                order, order_epoch = epoch_order(self.n, self.seed, epoch).to(device), epoch
            micro = []
            for a in range(self.accum_steps):
                lo = self.rank * share + a * self.micro
                at = s * self.batch_size + lo
                micro.append((slice(lo, lo + self.micro), order[at:at + self.micro]))
            yield step, micro

    def read(self, data: Union[ImageData, Split], start: int, total: int, size: int, device: torch.device,
             workers: int = -1, bad: str = 'raise', on_bad: Optional[Callable[[List[str]], None]] = None
             ) -> Iterator[Tuple[int, Iterator[MicroBatch]]]:
        """(step, its micro-batches as they are read) for steps ``start`` .. ``total`` - 1 (``data.read_batches``)."""
        where = data.images.device if isinstance(data, ImageData) else torch.device('cpu')
        count = (total - start) * self.accum_steps
        batches = read_batches(data, (pos for _, micro in self.plan(start, total, where) for _, pos in micro), size,
                               device, workers, count, bad, on_bad)
        try:
            for step, micro in self.plan(start, total, where):
                yield step, (MicroBatch(*next(batches), rows, a == self.accum_steps - 1)
                             for a, (rows, _) in enumerate(micro))
        finally:
            batches.close()
