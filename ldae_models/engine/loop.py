"""The training loop every run of the zoo shares: ``run(config, make_objective)``.

One process on a CPU or GPU, or torchrun on any number of GPUs and machines (DistributedDataParallel); an
``Objective`` says what is optimised (``train.DenoisingObjective``: l-DAE and the DDAE UNets; ``distill``: RepFusion).
``_Run`` reads top to bottom: ``__init__`` sets the run up (folder, config, objective, data, schedule, optimizer,
resume or prepare), ``loop`` runs the steps (``step``), ``checkpoint`` saves, ``finish`` exports.

What makes it fast and exact:

- Data that fits in memory (by bytes: ``data.fits_in_memory``) is decoded once per machine into a uint8 tensor on the
  device; a step cuts its batch out of it. Larger data sets stream (``data.stream``: workers read bytes, the GPU
  decodes). Both give the same center squares, augmented on the device from the step's draws.
- Every random draw of a step (the data order of its epoch, its crops, its t and noise) comes from seeds of (``seed``,
  epoch or step), drawn for the whole global batch on the device; a rank takes its slice. So a run resumed from a
  checkpoint ends in exactly the state of an uninterrupted run, and N processes give the model of one process with
  the same global batch (up to the order of floating-point sums).
- The step never waits for the device: the loss is read at log steps, and the non-finite check every
  ``nan_check_every`` steps and before every checkpoint. A non-finite loss stops the run with a message naming the
  step; the last good checkpoint is kept.
- bf16 autocast (the PCA tokenizer and the loss stay float32), fused AdamW, fused attention (timm's), optional
  ``torch.compile``; SIGTERM / SIGUSR1 checkpoint at the next step boundary (``runtime.Preempted``).
"""
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data import ImageData, Split, augment, normalize, open_split
from ..data.loader import StepBatches, training_source
from .checkpoint import CKPT_NAME, Checkpoints, check_resume, undo_on_failure
from .config import RunConfig
from .optim import build_optimizer, lr_at
from .runtime import (Float32DegenerateConvs, Preempted, StopSignals, process_group, resolve_amp, step_seed,
                      stop_requested)

__all__ = ['Objective', 'run', 'step_draws', 'Log']


class Objective(nn.Module):
    """What a run optimises, as a module the loop wraps (DistributedDataParallel, torch.compile).

    The loop (``run``) owns data, randomness, optimiser, precision, checkpoints and logging; an objective says:

    - ``trained``: the module whose weights are optimised, checkpointed, averaged (EMA) and exported;
    - ``img_size``: the side of the square images it takes;
    - ``build(num_classes)``: told the data's number of classes once it is loaded (a supervised student's head);
    - ``prepare(cfg, source, rank, world, device)``: once, at the start of a fresh run (l-DAE: the PCA fit on the
      training source, ``data.batches`` of it),
      logged as the stage ``prepare_stage(n)`` names;
    - ``draws(generator, batch, x)``: the random draws of a step for the whole global batch (``batch`` rows), from the
      step's generator on the device; each micro-batch gets its rows;
    - ``forward(x, y, **draws)``: the loss of a micro-batch (images in [-1, 1], labels, its rows of the draws);
    - ``begin_step(step, steps_per_epoch)``: told before each step (schedules inside the objective);
    - ``log_record()``: extra numbers for a log line (read only at log steps);
    - ``export(trained, cfg, out)``: the final files; returns the main one;
    - ``unused_parameters``: True when some trained parameters may take no part in a step's loss (a student's
      classifier while it is distilled): DistributedDataParallel must then look for them each step.
    """

    img_size: int = 0
    unused_parameters: bool = False

    @property
    def trained(self) -> nn.Module:
        raise NotImplementedError

    def build(self, num_classes: int) -> None:
        """Told the data's number of classes once the data is loaded, before the optimiser is made."""

    def prepare_stage(self, n: int) -> Optional[Tuple[str, Dict[str, Any]]]:
        """The log stage (name, info) of ``prepare`` on ``n`` images, if it does any work."""
        return None

    def prepare(self, cfg: RunConfig, source: Union[ImageData, Split], rank: int, world: int,
                device: torch.device) -> None:
        pass

    def draws(self, generator: torch.Generator, batch: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {}

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        pass

    def log_record(self) -> Dict[str, Any]:
        return {}

    def export(self, trained: nn.Module, cfg: RunConfig, out: Path) -> Path:
        raise NotImplementedError


class Log:
    """Rank 0's record of a run: a line per stage and one JSON line per log step, on stdout and in OUT/log.jsonl."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(out / 'log.jsonl', 'a') if enabled else None

    def __call__(self, **record: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        print(line, flush=True)
        self.file.write(line + '\n')
        self.file.flush()

    def stage(self, name: str, **info: Any) -> None:
        self(event='stage', stage=name, time=round(time.time(), 1), **info)

    def close(self) -> None:
        if self.file:
            self.file.close()

def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, unit='step', dynamic_ncols=True, disable=None if enabled else True)

def step_draws(cfg: RunConfig, step: int, objective: Objective, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The random draws of a step for the whole global batch, on the device, from the step's counter-based seed: the
    objective's (t, noise, ...), then the crop parameters."""
    gen = torch.Generator(x.device).manual_seed(step_seed(cfg.seed, 2, step))
    draws = objective.draws(gen, cfg.batch_size, x)
    draws['crop'] = torch.rand(cfg.batch_size, 5, generator=gen, device=x.device)
    return draws

def run(cfg: RunConfig, make_objective: Callable[[], Objective]) -> Dict[str, Any]:
    """The training loop every run of the zoo shares: one process or torchrun, exact resume, device-resident data,
    counter-based draws, no per-step host sync, bf16 autocast, EMA, atomic checkpoints, a log line per stage."""
    if not cfg.out:
        raise ValueError('--out is required')
    with process_group(cfg.device) as (rank, world, device):
        with undo_on_failure(Path(cfg.out), enabled=rank == 0):
            return _Run(cfg, make_objective, rank, world, device).loop()


def _num_classes(source: Union[ImageData, Split]) -> int:
    return len(source.classes) if source.classes else int(source.labels.max().item()) + 1


class _Run:
    """One run of ``run``: set up in ``__init__``, then ``loop``."""

    def __init__(self, cfg: RunConfig, make_objective: Callable[[], Objective], rank: int, world: int,
                 device: torch.device) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.is_main = rank == 0
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out, self.is_main)
        self._write_config()
        torch.manual_seed(cfg.seed)

        # the objective and its data
        objective = make_objective()
        self.log.stage('data', dataset=cfg.dataset, root=str(cfg.data_root))
        self.source = self._load_data(objective.img_size)
        objective.build(_num_classes(self.source))
        self.objective = objective.to(device)
        self.model = objective.trained

        # the schedule: warmup is a fraction of it, laid over the run's real length
        n = len(self.source)
        self.steps_per_epoch = n // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f'--batch-size {cfg.batch_size} is larger than the data set ({n} images)')
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.warmup = int(round(self.total_steps * min(1.0, cfg.warmup_epochs / max(cfg.epochs, 1e-9))))
        self.peak_lr = cfg.lr or cfg.blr * cfg.batch_size / 256
        self.milestones = [int(round(e * self.steps_per_epoch)) for e in cfg.lr_milestones]

        # optimizer, EMA, and the state: resumed, or prepared (l-DAE: the PCA fit)
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.ema)
        self.opt = build_optimizer(self.model, cfg, self.peak_lr, device)
        self.start_step = self._resume_or_prepare()
        self.ckpts = Checkpoints(self.out, cfg.keep_last, cfg.keep_every_epochs, self.steps_per_epoch,
                                 self.start_step, self.is_main)

        # the step's module: compiled, distributed; precision
        self.net: nn.Module = torch.compile(objective) if cfg.compile else objective
        if world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == 'cuda' else None,
                find_unused_parameters=objective.unused_parameters)
        self.amp = resolve_amp(cfg.amp, device)
        if self.amp and device.type == 'cpu':
            Float32DegenerateConvs(objective)
        # the first non-finite loss, recorded on the device (read every nan_check_every steps)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), device=device)

    def _write_config(self) -> None:
        """The resolved config, beside the checkpoints and at the head of the log."""
        if not self.is_main:
            return
        from ..hub.publish import write_text_atomic
        config = dataclasses.asdict(self.cfg)
        write_text_atomic(self.out / 'config.json', json.dumps(config, indent=1, default=str) + '\n')
        self.log(event='config', config={k: v for k, v in config.items() if k != 'sources'},
                 **({'sources': self.cfg.sources} if self.cfg.sources else {}))

    def _load_data(self, img_size: int) -> Union[ImageData, Split]:
        cfg = self.cfg
        if not cfg.data_root:
            raise ValueError('--data-root is required (an ImageFolder, a CIFAR-10 folder or an .npz file)')
        if cfg.dataset == 'folder' and not Path(cfg.data_root).exists():
            raise FileNotFoundError(f'--data-root not found: {cfg.data_root}')
        split = open_split(cfg.dataset, cfg.data_root, 'train', download=cfg.download)
        barrier = dist.barrier if self.world > 1 else (lambda: None)
        source, why = training_source(split, img_size, cfg.in_memory, self.device, cfg.workers, barrier,
                                      progress=self.is_main, key=str(self.out.resolve()), agree=self._all)
        self.log(event='data', images=len(split), how=why)
        return source

    def _all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (one answer for all, so that none waits alone)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def _resume_or_prepare(self) -> int:
        path = self.out / CKPT_NAME
        if self.cfg.resume and path.exists():
            state = torch.load(path, map_location='cpu', weights_only=True)
            check_resume(self.cfg, state, self.total_steps, path)
            self.model.load_state_dict(state['model'])
            self.opt.load_state_dict(state['optimizer'])
            if self.ema is not None and 'ema' in state:
                self.ema.module.load_state_dict(state['ema'])
            self.log(event='resumed', step=int(state['step']), checkpoint=str(path))
            return int(state['step'])
        stage = self.objective.prepare_stage(len(self.source))
        if stage is not None:
            self.log.stage(stage[0], **stage[1])
        self.objective.prepare(self.cfg, self.source, self.rank, self.world, self.device)
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
        return 0

    # -- the steps ------------------------------------------------------------------------------------------------

    def loop(self) -> Dict[str, Any]:
        cfg, log = self.cfg, self.log
        batches = StepBatches(self.source, self.objective.img_size, cfg.batch_size, cfg.accum_steps, self.world,
                              self.rank, self.start_step, self.total_steps, lambda e: step_seed(cfg.seed, 1, e),
                              self.device, cfg.workers)
        self.micro, self.part = batches.micro, batches.part
        log.stage('train', steps=self.total_steps, start=self.start_step, steps_per_epoch=self.steps_per_epoch,
                  warmup_steps=self.warmup, peak_lr=self.peak_lr, device=str(self.device), amp=bool(self.amp),
                  world=self.world, in_memory=isinstance(self.source, ImageData))
        progress = _progress(self.total_steps, self.start_step, self.is_main and not cfg.quiet)
        self.t0, self.seen, self.last, done = time.time(), 0, {}, self.start_step
        with StopSignals() as signals:  # SIGTERM / SIGUSR1: a checkpoint at the next step boundary, then stop
            for step, offset, images, labels in batches:
                if not self.step(step, offset, images, labels):
                    continue  # a micro-batch of the step, not its last
                step += 1
                done = step
                progress.update(1)
                self._after_step(step)
                if step < self.total_steps and stop_requested(signals, self.world, step, cfg.nan_check_every,
                                                              self.device):
                    progress.close()
                    self._preempt(step, signals)
        progress.close()
        return self.finish(done)

    def step(self, step: int, offset: int, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Forward and backward of one micro-batch; the optimizer step after the last. Returns whether it stepped."""
        cfg = self.cfg
        micro_i = (offset % self.part) // self.micro
        x = normalize(images)
        if micro_i == 0:
            self.lr = lr_at(step, self.total_steps, self.warmup, self.peak_lr, milestones=self.milestones,
                            gamma=cfg.lr_gamma)
            for group in self.opt.param_groups:
                group['lr'] = self.lr
            self.objective.begin_step(step, self.steps_per_epoch)
            self.draws = step_draws(cfg, step, self.objective, x)
        sl = slice(offset, offset + len(x))
        x = augment(x, cfg.aug, u=self.draws['crop'][sl])
        sync = micro_i == cfg.accum_steps - 1
        no_sync = self.net.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(**self.amp) if self.amp else contextlib.nullcontext():
                loss = self.net(x, labels, **{k: v[sl] for k, v in self.draws.items() if k != 'crop'})
            (loss / cfg.accum_steps).backward()
        self._record_finite(loss.detach(), step)
        self.loss = loss
        self.seen += len(x) * self.world
        if not sync:
            return False
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, step=step)
        return True

    def _after_step(self, step: int) -> None:
        """The log line, the non-finite check and the checkpoint that fall on ``step``."""
        cfg = self.cfg
        is_log = step % cfg.log_every == 0 or step == self.total_steps
        is_ckpt = self.ckpts.due(step, self.total_steps, cfg.ckpt_every)
        if is_log or is_ckpt or step % cfg.nan_check_every == 0:
            self.check_finite()
        if self.is_main and is_log:
            dt = time.time() - self.t0
            self.last = dict(step=step, epoch=round(step / self.steps_per_epoch, 3), loss=round(self.loss.item(), 6),
                             lr=self.lr, img_per_s=round(self.seen / max(dt, 1e-9), 1), elapsed_s=round(dt, 1),
                             **self.objective.log_record())
            self.log(**self.last)
        if is_ckpt:
            self.checkpoint(step)
        self._last_ckpt_step = step if is_ckpt else getattr(self, '_last_ckpt_step', None)

    def _record_finite(self, loss: torch.Tensor, step: int) -> None:
        is_bad = ~torch.isfinite(loss)
        first = is_bad & ~self.bad
        self.bad_step.copy_(torch.where(first, torch.full_like(self.bad_step, step), self.bad_step))
        self.bad_loss.copy_(torch.where(first, loss.float(), self.bad_loss))
        self.bad |= is_bad

    def check_finite(self) -> None:
        flag = self.bad.clone().float()
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            where = int(self.bad_step.item())
            path = self.ckpts.path
            raise FloatingPointError(
                f'non-finite loss ({self.bad_loss.item() if bool(self.bad) else "on another process"}) at step {where} '
                f'(epoch {max(where, 0) // self.steps_per_epoch}); the run stopped and the last good checkpoint is '
                f'kept: {path if path.exists() else "none written yet"}. Lower --lr / --blr, or check the data.')

    # -- checkpoints and the end ------------------------------------------------------------------------------------

    def checkpoint(self, step: int) -> None:
        if self.is_main:
            state = dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(), step=step,
                         total_steps=self.total_steps, config=dataclasses.asdict(self.cfg))
            if self.ema is not None:
                state['ema'] = self.ema.module.state_dict()
            self.ckpts.save(step, state)
        if self.world > 1:
            dist.barrier()

    def _preempt(self, step: int, signals: StopSignals) -> None:
        if getattr(self, '_last_ckpt_step', None) != step:
            self.check_finite()
            self.checkpoint(step)
        received = signals.received or 'a signal on another process'
        self.log(event='preempted', step=step, signal=received, checkpoint=str(self.ckpts.path))
        self.log.close()
        raise Preempted(step, self.ckpts.path, signals.received or 'a stop signal (on another process)')

    def finish(self, done: int) -> Dict[str, Any]:
        result: Dict[str, Any] = dict(step=done, total_steps=self.total_steps, last=self.last)
        if self.is_main and done >= self.total_steps:
            self.log.stage('export')
            trained = self.model if self.ema is None else self.ema.module
            result['weights'] = str(self.objective.export(trained, self.cfg, self.out))
        self.log.close()
        return result
