"""The configuration every training run of the zoo shares (``RunConfig``), nanoGPT-style: one dataclass, each field
with its default and the reason for it (the command line's help), bounds checked on creation. Each job extends it:
``jobs.pretrain.TrainConfig`` (the denoising model), ``jobs.repfusion.DistillConfig`` (RepFusion),
``jobs.linprobe.LinProbeConfig`` (MAE's linear probe); recipes (``jobs/recipes.py``) fill it from a table."""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

from ..data import AUGMENTATIONS, DATASETS

__all__ = ['RunConfig', 'check_bounds', 'arg']


def arg(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its reason (the command line's help)."""
    factory = kw.pop('factory', None)
    if factory is not None:
        return field(default_factory=factory, metadata=dict(help=help, **kw))
    return field(default=default, metadata=dict(help=help, **kw))


def check_bounds(cfg: Any) -> None:
    """Refuse a field outside the bounds its metadata states (``choices``, ``min``, ``above``, ``below``), naming its
    flag: the command line checks them too, a config built in Python gets the same message."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        flag = '--' + f.name.replace('_', '-')
        if meta.get('choices') and value is not None and value not in meta['choices']:
            raise ValueError(f'{flag} must be one of {", ".join(map(str, meta["choices"]))}; got {value!r}')
        if value is None or isinstance(value, (bool, str, dict)) or not any(k in meta for k in ('min', 'above', 'below')):
            continue
        if 'min' in meta and not value >= meta['min']:
            raise ValueError(f'{flag} must be >= {meta["min"]}, got {value}')
        if 'above' in meta and not value > meta['above']:
            raise ValueError(f'{flag} must be > {meta["above"]}, got {value}')
        if 'below' in meta and not value < meta['below']:
            raise ValueError(f'{flag} must be < {meta["below"]}, got {value}')


@dataclass
class RunConfig:
    """What every training run of the zoo shares (``ldae-models train`` and ``ldae-models distill``): data, budget and
    optimiser, precision, the run's folder, seed and checkpoints. ``vars`` of a run's config is stored in every
    checkpoint."""

    # -- data
    dataset: str = arg('folder', "'folder' (an ImageFolder), 'cifar10' (torchvision's files), 'npz'",
                        choices=DATASETS)
    data_root: str = arg('', 'the folder or file of the data set (ImageFolder root: its train/ is used)')
    download: bool = arg(False, 'download the data set where the network allows (cifar10)')
    in_memory: str = arg('auto', "decode the data set once per machine into device memory: 'auto' (when it takes at "
                                  "most a quarter of the free host and device memory), 'yes', 'no' (stream it)",
                          choices=('auto', 'yes', 'no'))
    aug: str = arg('center', "'center' square (the paper's default), 'flip' (+ horizontal flip, DiT's) or 'rrc' "
                              "(random resized crop of the center square + flip)", choices=AUGMENTATIONS)
    rrc_scale: List[float] = arg(None, "the area range of --aug rrc's random resized crop (MAE's pre-training: 0.2 1; "
                                       "its linear probe: 0.08 1)", factory=lambda: [0.2, 1.0])
    workers: int = arg(-1, 'DataLoader workers per process of the streaming path (-1: from the core count)', min=-1)
    skip_bad_images: bool = arg(False, 'put another image of its batch in the place of an image that cannot be read '
                                       '(each one logged and listed in OUT/skipped_images.txt; default: stop, naming '
                                       'it)')
    # -- budget and optimiser (App. A: AdamW, no weight decay, blr 1e-4, batch 2048, warmup 100 of 400 epochs)
    epochs: int = arg(400, 'epochs of the schedule (the paper: 400, 800, 1600)', min=0)
    max_steps: int = arg(0, 'end after this many steps instead; warmup and cosine are then laid over these steps (0: no '
                                'step limit, the epochs decide)', min=0)
    batch_size: int = arg(2048, 'global batch (the paper: 2048)', min=1)
    accum_steps: int = arg(1, 'micro-batches per step (gradient accumulation) when the batch does not fit', min=1)
    blr: float = arg(1e-4, 'base lr: lr = blr * batch / 256 (the paper)', min=0)
    lr: float = arg(0.0, 'absolute peak lr (overrides blr; 0: from blr)', min=0)
    warmup_epochs: float = arg(100, 'linear warmup (the paper: 100 of 400 epochs), then half-cycle cosine to 0', min=0)
    lr_milestones: List[float] = arg(None, 'epochs at which the lr is multiplied by --lr-gamma (a step decay instead '
                                           'of the cosine; none: cosine)', factory=list)
    lr_gamma: float = arg(0.1, 'the factor of each --lr-milestones step', above=0, below=1)
    opt: str = arg('adamw', "optimizer, by its name in timm's create_optimizer_v2 ('adamw', 'sgd', 'lars', 'lamb', ...); "
                           "weight decay spares 1-D parameters and each model's no_weight_decay()")
    momentum: float = arg(0.9, 'momentum of the SGD-family optimizers (sgd, lars, ...)', min=0, below=1)
    weight_decay: float = arg(0.0, 'weight decay (the paper: none)', min=0)
    clip_grad: float = arg(0.0, 'gradient-norm clip (0: off)', min=0)
    ema: float = arg(0.0, 'EMA decay of the weights, e.g. 0.9999 (0: off); the final weights are the EMA', min=0,
                      below=1)
    # -- precision and speed
    amp: str = arg('auto', "bf16 autocast: 'auto' (on a GPU, and on a CPU with AVX512-BF16 or AMX), 'bf16', 'off'",
                    choices=('auto', 'bf16', 'off'))
    compile: bool = arg(False, 'torch.compile the training step')
    nan_check_every: int = arg(25, 'steps between reads of the non-finite-loss flag (each read waits on the device)',
                                min=1)
    stop_check_s: float = arg(5.0, 'seconds between the processes\' agreement on a stop signal (several processes; one '
                                   'process stops at the next step): a stop costs at most this plus the checkpoint',
                              above=0)
    device: str = arg('auto', "'auto' (the local GPU if any), 'cpu', 'cuda'", choices=('auto', 'cpu', 'cuda'))
    # -- the run
    out: str = arg('', 'output folder: checkpoints, log.jsonl, final weights')
    seed: int = arg(0, 'the seed of every random draw of the run')
    resume: bool = arg(False, 'continue from OUT/ckpt_last.pth when it exists')
    allow_config_change: bool = arg(False, 'resume even where the model, batch, schedule length or seed differ from '
                                            "the checkpoint's (refused otherwise)")
    ckpt_every: int = arg(1000, 'steps between checkpoints (also at the end)', min=1)
    keep_last: int = arg(1, 'checkpoints kept: the newest (ckpt_last.pth) and the k - 1 before it '
                             '(ckpt_step*.pth)', min=1)
    keep_every_epochs: int = arg(0, 'also keep the checkpoint of every N-th epoch (ckpt_epoch*.pth; 0: none)', min=0)
    log_every: int = arg(50, 'steps between JSON log lines', min=1)
    quiet: bool = arg(False, 'no progress bar or progress lines (the JSON log lines stay)')
    provenance: Dict[str, str] = arg(None, 'where each value comes from (set by a recipe; saved with the run)',
                                     factory=dict, cli=False)

    # what a resumed run must share with its checkpoint (besides the schedule's length in steps)
    resume_fields = ('batch_size', 'seed', 'opt')

    def __post_init__(self) -> None:
        check_bounds(self)
