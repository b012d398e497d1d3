"""The training loop every job of the zoo runs on: ``run(config, make_objective)``.

An ``Objective`` says what is optimised (``jobs.pretrain``: l-DAE and the DDAE UNets; ``jobs.repfusion``: RepFusion's
two stages; ``jobs.linprobe``: MAE's linear probe); the loop owns everything else: processes, data, randomness,
optimiser, precision, checkpoints, preemption and the log. ``Session`` holds what a run of several stages shares
(the process group, the stop signals, the output folder); ``run`` is a session of one stage. A stage reads top to
bottom in ``_Stage.run``:

1. what can be refused is checked before anything is written: the data set (listed, not decoded), the objective,
   the schedule, the checkpoint a resume would continue;
2. the folder: ``config.json`` and ``log.jsonl``;
3. the data (decoded into memory when it fits, else streamed), the optimizer, the state (resumed, or prepared:
   the l-DAE's PCA fit is its first step);
4. the steps: ``for step, micro_batches in batches``, a micro-batch at a time, then the optimizer step, the log
   line, the checks and the checkpoint that fall on it;
5. the export of the final weights.

What makes it exact: every random draw of a step (the epoch's order, its crops, its t and noise) comes from a named
seed stream of (``seed``, epoch or step) (``seeds``), drawn for the whole global batch on the device; each
micro-batch reads its rows. So a run resumed from a checkpoint ends in the state of an uninterrupted run, and N
processes give the model of one process with the same global batch (up to the order of floating-point sums).

What makes it fast: data on the device or streamed by workers, no host sync in a step (the loss is read at log
steps, the non-finite check every ``nan_check_every`` steps, the stop check every ``stop_check_s`` seconds), bf16
autocast, fused AdamW, fused attention, optional ``torch.compile``.
"""
import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..data import ImageData, augment, check_data_root, normalize, open_split, training_data
from ..progress import Progress
from .checkpoint import CKPT_NAME, Checkpoints, check_output, check_resume, load_checkpoint, undo_on_failure
from .config import RunConfig
from .optim import build_optimizer, lr_at
from .runtime import (Float32DegenerateConvs, Preempted, StopCheck, StopSignals, process_group, resolve_amp)
from .sampler import StepBatches
from .seeds import Stream, generator

__all__ = ['Objective', 'Context', 'Log', 'Session', 'StageResult', 'run', 'step_draws']


@dataclass
class Context:
    """Where a stage runs, for an objective's ``prepare``: its config, process, device and log."""

    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    log: 'Log'

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process (one answer for all, so that none waits alone)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)


class Objective(nn.Module):
    """What a stage optimises, as a module the loop wraps (DistributedDataParallel, torch.compile). It is built by the
    job's ``make_objective(num_classes)`` once the data is listed, with everything it needs as arguments, and says:

    - ``trained``: the module whose weights are optimised, checkpointed, averaged (EMA) and exported;
    - ``img_size``: the side of the square images it takes, ``mean`` and ``std`` their normalisation;
      ``unused_parameters``: True when some trained parameters
      may take no part in a step's loss (DistributedDataParallel must then look for them each step);
    - ``prepare(data, ctx)``: once, at the start of a fresh stage (the l-DAE's PCA fit);
    - ``draws(generator, batch, device)``: the random draws of a step for the whole global batch (``batch`` rows);
      each micro-batch gets its rows;
    - ``begin_step(step, total_steps)``: told before each step (schedules inside the objective);
    - ``forward(images, labels, **draws)``: the loss of a micro-batch (images in [-1, 1]);
    - ``log_record()``: extra numbers for a log line (read only at log steps);
    - ``export(trained, out)``: the final files of the stage; returns the main one.
    """

    img_size: int = 0
    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)  # the images' normalisation (default: [-1, 1])
    std: Tuple[float, ...] = (0.5, 0.5, 0.5)
    unused_parameters: bool = False

    @property
    def trained(self) -> nn.Module:
        raise NotImplementedError

    def prepare(self, data: Any, ctx: Context) -> None:
        pass

    def draws(self, generator: torch.Generator, batch: int, device: torch.device) -> Dict[str, torch.Tensor]:
        return {}

    def begin_step(self, step: int, total_steps: int) -> None:
        pass

    def log_record(self) -> Dict[str, Any]:
        return {}

    def export(self, trained: nn.Module, out: Path) -> Path:
        raise NotImplementedError


class Log:
    """Process 0's record of a run: a line per stage and one JSON line per log step, on stdout at once and in
    OUT/log.jsonl once the folder is opened (``open``: every check has passed; the lines before are kept for it)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.file = None
        self.pending: List[str] = []

    def open(self, out: Path) -> None:
        if self.enabled:
            self.file = open(out / 'log.jsonl', 'a')
            for line in self.pending:
                self.file.write(line + '\n')
            self.file.flush()
            self.pending = []

    def __call__(self, **record: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        print(line, flush=True)
        if self.file is None:
            self.pending.append(line)
        else:
            self.file.write(line + '\n')
            self.file.flush()

    def stage(self, name: str, **info: Any) -> None:
        self(event='stage', stage=name, time=round(time.time(), 1), **info)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


@dataclass
class StageResult:
    """What a stage leaves: the step reached, its schedule, the last log record, the main exported file (None when it
    stopped before the end), and the trained module (the EMA weights with ``ema``) in memory."""

    step: int
    total_steps: int
    last: Dict[str, Any]
    weights: Optional[Path]
    trained: nn.Module


def step_draws(cfg: RunConfig, step: int, objective: Objective, device: torch.device) -> Dict[str, torch.Tensor]:
    """The random draws of a step for the whole global batch, on the device, from the step's seed (``STEP_DRAWS``):
    the objective's (t, noise, ...), then the crop parameters."""
    gen = generator(cfg.seed, Stream.STEP_DRAWS, step, device=device)
    draws = objective.draws(gen, cfg.batch_size, device)
    draws['crop'] = torch.rand(cfg.batch_size, 5, generator=gen, device=device)
    return draws


class Session:
    """What the stages of one run share: the output folder (checked before any work), the stop signals (installed
    before the data is listed, so that a notice during the set-up is honoured), the process group, and the undoing
    of a run that fails before its first checkpoint (the folder left as it was found)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.out = check_output(cfg.out)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> 'Session':
        self.signals = self._stack.enter_context(StopSignals())
        self.rank, self.world, self.device = self._stack.enter_context(process_group(self.cfg.device))
        self._stack.enter_context(undo_on_failure(self.out, enabled=self.rank == 0))
        return self

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self._stack.__exit__(*exc)

    def stage(self, cfg: RunConfig, make_objective: Callable[[int], Objective]) -> StageResult:
        """Run one stage of this session to its end (or from its checkpoint); ``cfg.out`` is the stage's folder."""
        return _Stage(self, cfg, make_objective).run()


def run(cfg: RunConfig, make_objective: Callable[[int], Objective]) -> StageResult:
    """A run of one stage: one process or torchrun, exact resume, device-resident or streamed data, counter-based
    draws, no per-step host sync, bf16 autocast, EMA, atomic checkpoints, a log line per stage."""
    with Session(cfg) as session:
        return session.stage(cfg, make_objective)


class _Stage:
    """One stage of a session: ``run`` reads top to bottom (see the module docstring)."""

    def __init__(self, session: Session, cfg: RunConfig, make_objective: Callable[[int], Objective]) -> None:
        self.session, self.cfg, self.make_objective = session, cfg, make_objective
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.is_main = self.rank == 0
        self.out = Path(cfg.out)
        self.log = Log(self.is_main)

    def run(self) -> StageResult:
        cfg, log = self.cfg, self.log
        # 1. what can be refused, before anything is written
        check_data_root(cfg.dataset, cfg.data_root, ('train',), cfg.download)
        split = open_split(cfg.dataset, cfg.data_root, 'train', download=cfg.download)
        torch.manual_seed(cfg.seed)  # the model's initialisation
        objective = self.make_objective(len(split.classes) or int(split.labels.max()) + 1)
        batches = StepBatches(len(split), cfg.batch_size, cfg.accum_steps, self.world, self.rank, cfg.seed)  # checked
        total = cfg.max_steps or cfg.epochs * batches.steps_per_epoch
        state = self._checkpoint_to_resume(total)

        # 2. the folder: the resolved config beside the checkpoints, the log
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_config()
            log.open(self.out)
        log.stage('data', dataset=cfg.dataset, root=str(cfg.data_root))
        bad = 'fill' if cfg.skip_bad_images else 'raise'  # an unreadable image: another of its batch, or stop
        data, why = training_data(split, objective.img_size, cfg.in_memory, self.device, cfg.workers,
                                  self._barrier, progress=self.is_main and not cfg.quiet, key=str(self.out.resolve()),
                                  agree=self._context().agree,
                                  bad=bad, on_bad=self._skipped)
        log(event='data', images=len(split), how=why)

        # 3. the model, the optimizer and the state: resumed, or prepared
        objective = objective.to(self.device)
        model = objective.trained
        ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3
            ema = ModelEmaV3(model, decay=cfg.ema)
        peak_lr = cfg.lr or cfg.blr * cfg.batch_size / 256
        warmup = int(round(total * min(1.0, cfg.warmup_epochs / max(cfg.epochs, 1e-9))))
        milestones = [int(round(e * batches.steps_per_epoch)) for e in cfg.lr_milestones]
        opt = build_optimizer(model, cfg, peak_lr, self.device)
        stop = StopCheck(self.session.signals, self.world, self.device, cfg.stop_check_s)
        if state is not None:
            model.load_state_dict(state['model'])
            opt.load_state_dict(state['optimizer'])
            if ema is not None and 'ema' in state:
                ema.module.load_state_dict(state['ema'])
            start = int(state['step'])
            log(event='resumed', step=start, checkpoint=str(self.out / CKPT_NAME))
        else:
            objective.prepare(data, self._context())
            if ema is not None:
                ema.module.load_state_dict(model.state_dict())
            start = 0
        ckpts = Checkpoints(self.out, cfg.keep_last, cfg.keep_every_epochs, batches.steps_per_epoch, start,
                            self.is_main)
        self.ckpts, self.model, self.opt, self.ema, self.total = ckpts, model, opt, ema, total
        saved = start if state is not None else None  # the step of the newest checkpoint
        if start < total and stop.now(start):  # a notice during the set-up: keep what the set-up did
            self._preempt(start, saved)

        # the step's module: compiled, distributed; precision
        net: nn.Module = torch.compile(objective) if cfg.compile else objective
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                find_unused_parameters=objective.unused_parameters)
        amp = resolve_amp(cfg.amp, self.device)
        if amp and self.device.type == 'cpu':
            Float32DegenerateConvs(objective)
        finite = _FiniteCheck(self.device)

        # 4. the steps
        if warmup >= total > start:
            log(event='warning', message=f'--warmup-epochs {cfg.warmup_epochs:g} covers the whole run ({total} steps): '
                                         f'the lr rises to its peak at the last step and never decays')
        log.stage('train', steps=total, start=start, steps_per_epoch=batches.steps_per_epoch, warmup_steps=warmup,
                  peak_lr=peak_lr, device=str(self.device), amp=bool(amp), world=self.world,
                  in_memory=isinstance(data, ImageData))
        last: Dict[str, Any] = {}
        t0, seen, step = time.time(), 0, start
        with Progress(total, 'train', unit='step', enabled=self.is_main and not cfg.quiet, initial=start) as bar:
            for step, micro_batches in batches.read(data, start, total, objective.img_size, self.device, cfg.workers,
                                                    bad, self._skipped):
                lr = lr_at(step, total, warmup, peak_lr, milestones=milestones, gamma=cfg.lr_gamma)
                for group in opt.param_groups:
                    group['lr'] = lr
                objective.begin_step(step, total)
                draws = step_draws(cfg, step, objective, self.device)
                for micro in micro_batches:  # gradients averaged over the processes after the last one only
                    x = augment(normalize(micro.images, objective.mean, objective.std), cfg.aug,
                                scale=tuple(cfg.rrc_scale), u=draws['crop'][micro.rows])
                    with contextlib.nullcontext() if micro.last or self.world == 1 else net.no_sync():
                        with torch.autocast(**amp) if amp else contextlib.nullcontext():
                            loss = net(x, micro.labels, **{k: v[micro.rows] for k, v in draws.items() if k != 'crop'})
                        (loss / cfg.accum_steps).backward()
                    finite.record(loss.detach(), step)
                    seen += len(x) * self.world
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model, step=step)
                step += 1
                bar.update(1)

                # the log line, the checks and the checkpoint that fall on this step
                is_log = step % cfg.log_every == 0 or step == total
                is_ckpt = ckpts.due(step, total, cfg.ckpt_every)
                if is_log or is_ckpt or step % cfg.nan_check_every == 0:
                    finite.check(self.world, ckpts.path, batches.steps_per_epoch)
                if is_log and self.is_main:
                    dt = time.time() - t0
                    last = dict(step=step, epoch=round(step / batches.steps_per_epoch, 3), loss=round(loss.item(), 6),
                                lr=lr, img_per_s=round(seen / max(dt, 1e-9), 1), elapsed_s=round(dt, 1),
                                **objective.log_record())
                    log(**last)
                if step in (start + 1, start + 10) and self.device.type == 'cuda':
                    self._log_memory(step, objective, micro.images.shape[0])
                if is_ckpt:
                    self._checkpoint(step)
                    saved = step
                if step < total and stop(step):
                    bar.close()
                    finite.check(self.world, ckpts.path, batches.steps_per_epoch)
                    self._preempt(step, saved)

        # 5. the end: the final weights
        final = model if ema is None else ema.module
        weights = None
        if self.is_main and step >= total:
            log.stage('export')
            weights = objective.export(final, self.out)
        log.close()
        return StageResult(step=step, total_steps=total, last=last, weights=weights, trained=final)

    # -- the parts ---------------------------------------------------------------------------------------------------

    def _context(self) -> Context:
        return Context(self.cfg, self.rank, self.world, self.device, self.log)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _checkpoint_to_resume(self, total: int) -> Optional[Dict[str, Any]]:
        """The checkpoint ``--resume`` continues (checked against this run: refused before anything is written)."""
        path = self.out / CKPT_NAME
        if not (self.cfg.resume and path.is_file()):
            return None
        state = load_checkpoint(path)
        check_resume(self.cfg, state, total, path)
        return state

    def _write_config(self) -> None:
        from ..hub.publish import write_text_atomic
        config = dataclasses.asdict(self.cfg)
        write_text_atomic(self.out / 'config.json', json.dumps(config, indent=1, default=str) + '\n')
        self.log(event='config', config={k: v for k, v in config.items() if k != 'provenance'},
                 **({'provenance': self.cfg.provenance} if self.cfg.provenance else {}))

    def _skipped(self, lines: List[str]) -> None:
        """Images that could not be read (``--skip-bad-images``): logged, and listed in OUT/skipped_images.txt."""
        for line in lines:
            self.log(event='skipped_image', image=line)
        if self.is_main and self.out.is_dir():
            with open(self.out / 'skipped_images.txt', 'a') as f:
                f.write(''.join(line + '\n' for line in lines))

    def _checkpoint(self, step: int) -> None:
        if self.is_main:
            state = dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(), step=step,
                         total_steps=self.total, config=dataclasses.asdict(self.cfg))
            if self.ema is not None:
                state['ema'] = self.ema.module.state_dict()
            self.ckpts.save(step, state)
        self._barrier()

    def _preempt(self, step: int, saved: Optional[int]) -> None:
        """Checkpoint at ``step`` (unless the newest checkpoint, of step ``saved``, is of it) and stop."""
        if saved != step:
            self._checkpoint(step)
        received = self.session.signals.received or 'a stop signal (on another process)'
        self.log(event='preempted', step=step, signal=received, checkpoint=str(self.ckpts.path))
        self.log.close()
        raise Preempted(step, self.ckpts.path, received)

    def _log_memory(self, step: int, objective: Objective, micro_batch: int) -> None:
        """On a GPU, the planned and the measured peak memory side by side (the first steps)."""
        plan = getattr(objective, 'planned_memory_gb', None)
        planned = plan(micro_batch, self.world, bool(self.cfg.ema)) if plan is not None else None
        self.log(event='memory', step=step, micro_batch=micro_batch, planned_gb=planned,
                 measured_peak_gb=round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2),
                 device_total_gb=round(torch.cuda.get_device_properties(self.device).total_memory / 1e9, 1))


class _FiniteCheck:
    """The first non-finite loss of a run, recorded on the device (no host sync) and read at ``check``."""

    def __init__(self, device: torch.device) -> None:
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)

    def record(self, loss: torch.Tensor, step: int) -> None:
        is_bad = ~torch.isfinite(loss)
        first = is_bad & ~self.bad
        self.step.copy_(torch.where(first, torch.full_like(self.step, step), self.step))
        self.loss.copy_(torch.where(first, loss.float(), self.loss))
        self.bad |= is_bad

    def check(self, world: int, path: Path, steps_per_epoch: int) -> None:
        """Raise a ``FloatingPointError`` naming the step when any process saw a non-finite loss."""
        flag = self.bad.clone().float()
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            where = int(self.step.item())
            raise FloatingPointError(
                f'non-finite loss ({self.loss.item() if bool(self.bad) else "on another process"}) at step {where} '
                f'(epoch {max(where, 0) // steps_per_epoch}); the run stopped and the last good checkpoint is '
                f'kept: {path if path.exists() else "none written yet"}. Lower --lr / --blr, or check the data.')
