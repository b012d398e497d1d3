"""Progress of long work, the same way everywhere: tqdm's bar on a terminal, and where the output is a file (a batch
job's log) a plain line at a steady interval, so that long work never looks dead in a log::

    extract train: 12,000 / 50,000 img (24%), 410 img/s, 1 min 33 s left

``Progress`` is what training, distillation, extraction, the probes, the floors, the grid, decoding into memory and
``check-data`` use. Lines go to stderr (stdout stays the result)."""
import sys
import time
from typing import Any, Optional, TextIO

__all__ = ['Progress', 'EVERY_S']

EVERY_S = 30.0  # seconds between two progress lines when the output is not a terminal


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds} s'
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f'{minutes} min {s} s'
    hours, m = divmod(minutes, 60)
    return f'{hours} h {m} min'


class Progress:
    """``total`` units of work (``unit``: 'img', 'step'), ``update(n)`` as they are done, ``close()`` at the end (or
    use it as a context manager). ``enabled=False`` shows nothing. On a terminal: tqdm's bar; otherwise a line every
    ``every_s`` seconds and one at the end, with the rate and the time left."""

    def __init__(self, total: Optional[int], desc: str, unit: str = 'img', enabled: bool = True, initial: int = 0,
                 every_s: float = EVERY_S, stream: Optional[TextIO] = None) -> None:
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done, self.start_done = initial, initial
        self.every_s, self.stream = every_s, stream or sys.stderr
        self.t0 = self.last = time.monotonic()
        self.bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False,
                            file=self.stream)

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self._line()

    def line(self) -> str:
        """The progress as one line (what a log shows)."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        text = f'{self.desc}: {self.done:,}'
        if self.total:
            text += f' / {self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)'
        else:
            text += f' {self.unit}'
        text += f', {rate:,.1f} {self.unit}/s' if rate < 100 else f', {rate:,.0f} {self.unit}/s'
        if self.total and rate > 0 and self.done < self.total:
            text += f', {_duration((self.total - self.done) / rate)} left'
        elif self.total and self.done >= self.total:
            text += f', {_duration(elapsed)}'
        return text

    def _line(self) -> None:
        self.last = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.done > self.start_done:
            self._line()
        self.enabled = False
