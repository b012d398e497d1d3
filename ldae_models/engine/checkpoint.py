"""A run's folder and its checkpoints: the folder checked before any work (``check_output``), checkpoints written
atomically and durably, the last k kept plus one every N epochs, a resume of another run refused before anything is
written, and a run that fails before its first checkpoint leaves its folder as it found it. Checkpoints hold only
tensors and plain containers (``torch.load(weights_only=True)``)."""
import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator

import torch

__all__ = ['CKPT_NAME', 'save_checkpoint', 'load_checkpoint', 'Checkpoints', 'check_resume', 'check_output',
           'undo_on_failure']

CKPT_NAME = 'ckpt_last.pth'


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write atomically and durably: a temporary file in the same folder, flushed to the disk (fsync), then a rename
    (and the folder's entry synced), so that a machine that dies at any moment leaves the old or the new file."""
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform whose folders cannot be opened (Windows): the rename is what it offers
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A run's checkpoint (tensors and plain containers only)."""
    return torch.load(path, map_location='cpu', weights_only=True)


def check_output(out: Any, flag: str = '--out') -> Path:
    """The output folder, refused before any work where it cannot be one: missing, a file, or inside a file."""
    if not out:
        raise ValueError(f'{flag} is required (the output folder)')
    path = Path(out)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = 'is a file' if p == path else f'is inside {p}, which is a file'
                raise ValueError(f'{flag} {out} {what}, not a folder: choose a folder')
            if not os.access(p, os.W_OK):
                raise PermissionError(f'{flag} {out}: {p} is not writable')
            break
    return path


def _keep_as(path: Path, name: Path) -> None:
    """Keep the file at ``path`` also as ``name`` (a hard link: no copy; a copy where links are not offered)."""
    import shutil
    name.unlink(missing_ok=True)
    try:
        os.link(path, name)
    except OSError:
        shutil.copy2(path, name)

def check_resume(cfg: Any, state: Dict[str, Any], total_steps: int, path: Path) -> None:
    """Refuse to resume a checkpoint of another run: its model, batch, schedule length (steps) or seed (the config's
    ``resume_fields``) must be this config's, unless ``allow_config_change``."""
    saved = state.get('config') or {}
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    diff = [(f, saved.get(f), mine.get(f)) for f in cfg.resume_fields if f in saved and saved.get(f) != mine.get(f)]
    if 'total_steps' in state and int(state['total_steps']) != total_steps:
        diff.append(('schedule length in steps (--epochs / --max-steps)', int(state['total_steps']), total_steps))
    if diff and not cfg.allow_config_change:
        what = '; '.join(f'{f}: {a!r} in the checkpoint, {b!r} now' for f, a, b in diff)
        raise ValueError(f'{path} is a checkpoint of another run ({what}): resume with the same settings, or pass '
                         f'--allow-config-change to continue it anyway')

@contextlib.contextmanager
def undo_on_failure(out: Path, enabled: bool = True) -> Iterator[None]:
    """A run that fails before its first checkpoint leaves ``out`` as it found it: the folder is removed if the run
    created it, else what the run added to it (its log, its config). A run with a checkpoint (in ``out`` or a stage
    folder below it) keeps everything: it resumes from there."""
    import shutil
    before = {p.name for p in out.iterdir()} if out.is_dir() else None
    try:
        yield
    except BaseException:
        if enabled and out.is_dir() and not any(out.rglob(CKPT_NAME)):
            if before is None:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for path in out.iterdir():
                    if path.name not in before:
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise


class Checkpoints:
    """The checkpoints of a run's folder: ``ckpt_last.pth`` (the newest), the ``keep_last - 1`` before it
    (``ckpt_step*.pth``, hard links: no copy) and the one of every ``keep_every_epochs``-th epoch
    (``ckpt_epoch*.pth``). Only the main process writes."""

    def __init__(self, out: Path, keep_last: int, keep_every_epochs: int, steps_per_epoch: int, start_step: int,
                 enabled: bool) -> None:
        self.out, self.path = out, out / CKPT_NAME
        self.keep_last, self.keep_every_epochs, self.steps_per_epoch = keep_last, keep_every_epochs, steps_per_epoch
        self.saved, self.enabled = start_step, enabled

    def due(self, step: int, total_steps: int, every: int) -> bool:
        """Whether ``step`` is a checkpoint step: every ``every`` steps, the last step and each kept epoch's end."""
        kept_epoch = self.keep_every_epochs > 0 and step % (self.keep_every_epochs * self.steps_per_epoch) == 0
        return step % every == 0 or step == total_steps or kept_epoch

    def save(self, step: int, state: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.keep_last > 1 and self.path.exists():  # the previous one stays, under its step's name
            _keep_as(self.path, self.out / f'ckpt_step{self.saved:08d}.pth')
        save_checkpoint(self.path, state)
        self.saved = step
        epoch, within = divmod(step, self.steps_per_epoch)
        if self.keep_every_epochs and not within and epoch % self.keep_every_epochs == 0:
            _keep_as(self.path, self.out / f'ckpt_epoch{epoch:04d}.pth')
        for old in sorted(self.out.glob('ckpt_step*.pth'))[:-(self.keep_last - 1) or None]:
            old.unlink()
