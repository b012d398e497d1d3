"""The training engine every job of the zoo runs on: the loop (``loop``: ``run``, ``Session``, ``Objective``), its
sampler (``sampler``), the named seed streams (``seeds``), checkpoints and the run's folder (``checkpoint``), the
optimizer and lr schedule (``optim``), the configuration every run shares (``config``), and where it runs
(``runtime``: device, processes, precision, stop signals). The jobs (``jobs/``) are objectives on it."""
from .checkpoint import (CKPT_NAME, Checkpoints, check_output, check_resume, load_checkpoint, save_checkpoint,
                         undo_on_failure)
from .config import RunConfig, arg, check_bounds
from .loop import Context, Log, Objective, Session, StageResult, run, step_draws
from .optim import ADAMW_BETAS, ADAMW_BETAS_SOURCE, build_optimizer, lr_at, no_weight_decay_names
from .runtime import (HOST_SYNC_OPS, PREEMPTED_EXIT_CODE, STOP_SIGNALS, Float32DegenerateConvs, HostSyncCounter,
                      Preempted, StopCheck, StopSignals, cpu_has_native_bf16, process_group, resolve_amp, resolve_device)
from .sampler import MicroBatch, StepBatches, accumulation_steps
from .seeds import Stream, epoch_order, generator, seed_of

__all__ = ['RunConfig', 'arg', 'check_bounds', 'Objective', 'Context', 'Session', 'StageResult', 'run', 'step_draws',
           'Log', 'build_optimizer', 'lr_at', 'no_weight_decay_names', 'ADAMW_BETAS', 'ADAMW_BETAS_SOURCE',
           'CKPT_NAME', 'Checkpoints', 'check_output', 'check_resume', 'load_checkpoint', 'save_checkpoint',
           'undo_on_failure', 'PREEMPTED_EXIT_CODE', 'STOP_SIGNALS', 'Float32DegenerateConvs', 'Preempted',
           'StopCheck', 'StopSignals', 'HostSyncCounter', 'HOST_SYNC_OPS', 'cpu_has_native_bf16', 'process_group', 'resolve_amp', 'resolve_device',
           'StepBatches', 'MicroBatch', 'accumulation_steps', 'Stream', 'seed_of', 'generator', 'epoch_order']
