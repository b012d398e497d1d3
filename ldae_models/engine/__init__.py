"""The training engine every run of the zoo shares: its configuration (``config``), the loop (``loop``), the
optimizer and lr schedule (``optim``), checkpoints (``checkpoint``) and where it runs (``runtime``: processes,
precision, seeds, stop signals). ``train.py`` (denoising) and ``distill.py`` (RepFusion) are jobs on it."""
from .checkpoint import CKPT_NAME, Checkpoints, check_resume, save_checkpoint, undo_on_failure
from .config import RunConfig, check_bounds
from .loop import Log, Objective, run, step_draws
from .optim import build_optimizer, lr_at, no_weight_decay_names
from .runtime import (PREEMPTED_EXIT_CODE, Float32DegenerateConvs, Preempted, StopSignals, cpu_has_native_bf16,
                      process_group, resolve_amp, step_seed)

__all__ = ['RunConfig', 'check_bounds', 'Objective', 'run', 'step_draws', 'Log', 'build_optimizer', 'lr_at',
           'no_weight_decay_names', 'CKPT_NAME', 'Checkpoints', 'check_resume', 'save_checkpoint', 'undo_on_failure',
           'PREEMPTED_EXIT_CODE', 'Float32DegenerateConvs', 'Preempted', 'StopSignals', 'cpu_has_native_bf16',
           'process_group', 'resolve_amp', 'step_seed']
