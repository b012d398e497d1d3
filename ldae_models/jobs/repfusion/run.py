"""RepFusion: a diffusion teacher's features distilled into any timm student, the timestep chosen by a learned policy.

*Diffusion Model as Representation Learner* (Yang and Wang, arXiv 2308.10916). Two stages of one session of the zoo's
training engine (``engine.Session``: one process or torchrun, exact resume, bf16, seeds); the teacher is
``teacher.py``, the objective ``objective.py``, the policies, heads and losses ``parts.py``:

1. **Distillation** (``OUT/distill``): for each image a timestep t is chosen by the ``policy``
   (``repfusion.POLICIES``: fixed, random, reinforce); the teacher (any extractor of the zoo, always loaded
   conditional: an l-DAE encoder, a DiT encoder, a DDAE UNet) gives its pooled feature at t, tapped at a block
   (``teacher_layer``) or at any module (``teacher_module``: the official code taps the DDPM UNet's mid block,
   ``mid.1.res.conv2``), of the image noised at t (``teacher_input='noisy'``) or of the clean image with t as
   conditioning (``'clean'``, the official code); a linear projector maps the student's pooled feature to the
   teacher's width; the loss is ``kd_weight`` times ``repfusion.KD_LOSSES[kd_loss]``. A learned policy is trained by
   REINFORCE with the reward ``-CE`` of a task head (``repfusion.TASK_HEADS``) on the teacher's feature, an entropy
   bonus that decays linearly to 0 over the first ``entropy_decay`` of the stage, and (ours) a moving-average
   baseline.
2. **Task** (``OUT/task``): the student fine-tuned on the labels (cross-entropy), keeping the distillation loss with
   ``task_kd_weight`` (default 0); it starts from stage 1's weights (in memory), loaded strictly. ``epochs=0`` skips
   stage 1: a student trained from scratch, the baseline. At the end the student's top-1 on the test split is
   measured and printed (``OUT/results.json``), and with ``scratch_baseline`` the same task stage from random
   weights (``OUT/scratch``) beside it.

Output: ``OUT/student/``, a ``save_pretrained`` folder that plain timm loads (``local-dir:OUT/student``);
``OUT/policy.safetensors`` (reinforce); ``OUT/t_histogram.json`` and ``.png``, the distribution of the chosen t over
the distillation (the paper's observation: it drifts to t in 0-200).

    ldae-models distill --recipe repfusion_cifar10 --dataset cifar10 --data-root ~/data --out runs/repfusion
    ldae-models distill --teacher ldae_vit_tiny_patch4_32.cifar10 --student resnet18_cifar --dataset cifar10 \\
        --data-root ~/data --out runs/repfusion --policy reinforce --epochs 100 --task-epochs 100

``recipes.DISTILL_RECIPES['repfusion_cifar10']`` is the official recipe; the defaults here are ours (AdamW, cosine,
a zero-initialised policy CNN, a small task head, a reward baseline: see the README's table of departures).
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from ...engine import RunConfig, Session, arg
from .objective import Distillation
from .parts import KD_LOSSES, POLICIES, POLICY_NETS, TASK_HEADS
from .teacher import Teacher, load_teacher

__all__ = ['DistillConfig', 'distill']


@dataclass
class DistillConfig(RunConfig):
    """A RepFusion run: the distillation stage (``epochs``) then the task stage (``task_epochs``)."""

    resume_fields = RunConfig.resume_fields + ('teacher', 'student', 'student_args', 'policy', 't_bins')

    # -- the teacher
    teacher: str = arg('ldae_vit_tiny_patch4_32.cifar10', 'an extractor of the zoo (NAME.TAG, local-dir:, hf-hub:)')
    teacher_args: Dict[str, Any] = arg(None, 'teacher constructor overrides as JSON', factory=dict)
    teacher_layer: Optional[int] = arg(None, "the teacher's tapped layer (0-based; default: its own default tap; with "
                                             "--teacher-module: how far the teacher runs, default its first block)")
    teacher_module: Optional[str] = arg(None, "a module of the teacher whose output is distilled (pooled) instead of a "
                                              "block, e.g. mid.1.res.conv2: the DDPM UNet's mid block (the official)")
    teacher_input: str = arg('noisy', "'noisy': the image noised at t by the teacher's schedule; 'clean': the clean "
                                       "image with t as conditioning (the official code)", choices=('noisy', 'clean'))
    allow_random_teacher: bool = arg(False, 'accept a teacher without trained weights (tests, smoke runs)')
    # -- the student
    student: str = arg('resnet18', 'any timm model name')
    student_args: Dict[str, Any] = arg(None, 'student constructor arguments as JSON, e.g. {"img_size": 32}',
                                        factory=dict)
    student_layer: Optional[str] = arg(None, "the student module whose output is distilled (pooled); default: the "
                                              "pooled pre-logits")
    # -- the timestep policy
    policy: str = arg('reinforce', "'fixed' (one t), 'random' (uniform over the grid), 'reinforce' (learned)",
                       choices=tuple(POLICIES))
    policy_net: str = arg('cnn', "the learned policy's network: 'cnn' (ours: uniform at the start, any size) or "
                                 "'lenet' (the official PolicyNet_Cov, 32 px)", choices=tuple(POLICY_NETS))
    task_head: str = arg('small', "the reward's head on the teacher feature: 'small' (ours: d-256-classes) or "
                                  "'official' (d-d-d-classes)", choices=tuple(TASK_HEADS))
    reward_baseline: str = arg('moving', "REINFORCE's baseline: 'moving' (ours: a moving average of the reward) or "
                                         "'none' (the official)", choices=('moving', 'none'))
    t: Optional[float] = arg(None, "the fixed policy's t (default: the teacher's own t)")
    t_bins: int = arg(1000, "the policy's grid: this many steps evenly over the teacher's [0, T) (the official: 1000)",
                       min=2)
    kd_loss: str = arg('mse', "the distillation loss: 'mse' (the paper's), 'mse_norm', 'l1', 'cosine' (the official "
                              "code's alternatives)", choices=tuple(KD_LOSSES))
    kd_weight: float = arg(1.0, 'weight of the distillation loss in stage 1', min=0)
    entropy_weight: float = arg(0.1, "the policy's entropy bonus at the start (the official: 0.1)", min=0)
    entropy_decay: float = arg(0.5, 'fraction of stage 1 over which the entropy bonus decays linearly to 0 '
                                     '(the official: 100 of 200 epochs)', min=0)
    baseline_momentum: float = arg(0.9, "momentum of REINFORCE's moving-average reward baseline", min=0, below=1)
    # -- the task stage
    task_epochs: int = arg(0, 'epochs of stage 2, the student fine-tuned on labels (0: none)', min=0)
    task_kd_weight: float = arg(0.0, 'keep the distillation loss in stage 2 with this weight', min=0)
    scratch_baseline: bool = arg(False, 'also train the same student from random weights with the task stage\'s recipe '
                                        '(OUT/scratch) and report its top-1 beside the distilled one')
    # RunConfig defaults that differ for a supervised student
    epochs: int = arg(100, 'epochs of stage 1, the distillation (0: none; the student is trained from scratch)', min=0)
    batch_size: int = arg(128, 'global batch', min=1)
    blr: float = arg(2e-3, 'base lr: lr = blr * batch / 256', min=0)
    warmup_epochs: float = arg(5, 'linear warmup epochs of each stage, then half-cycle cosine to 0', min=0)
    weight_decay: float = arg(0.05, 'weight decay (spares norms, biases and no_weight_decay())', min=0)



def _check_student(name: str) -> None:
    """Refuse a student timm does not know, in one line with the nearest names."""
    import difflib
    import timm
    if name.startswith(('hf-hub:', 'local-dir:')) or timm.is_model(name):
        return
    near = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    raise ValueError(f'unknown student model {name!r}: timm has no such model'
                     + (f' (did you mean {", ".join(near)}?)' if near else "; timm.list_models('resnet*') lists names"))


def _img_size(cfg: DistillConfig, teacher: Optional[Teacher]) -> int:
    """The image side of a run: the teacher's input size (the student gets the same images)."""
    if teacher is not None:
        return int(teacher.model.pretrained_cfg['input_size'][-1])
    if 'img_size' in cfg.student_args:
        s = cfg.student_args['img_size']
        return int(s if isinstance(s, int) else s[-1])
    from ...models import pretrained_cfg_for
    return int(pretrained_cfg_for(cfg.teacher)['input_size'][-1])


def distill(cfg: DistillConfig) -> Dict[str, Any]:
    """Run both stages (each resumable) in one session; the last writes ``OUT/student``; then the student's top-1 on
    the test split (and, with ``scratch_baseline``, the same student trained from scratch). Returns the paths and
    the accuracies (also in ``OUT/results.json``)."""
    if cfg.epochs + cfg.task_epochs == 0:
        raise ValueError('nothing to run: give --epochs (distillation) and/or --task-epochs (the task)')
    if cfg.max_steps:
        raise ValueError('distill runs whole epochs: --max-steps is not available (use --epochs, --task-epochs)')
    _check_student(cfg.student)
    out = Path(cfg.out)
    with Session(cfg) as session:
        teacher = None
        if cfg.epochs > 0 or cfg.task_kd_weight > 0:
            teacher = Teacher(load_teacher(cfg.teacher, cfg.teacher_args, cfg.allow_random_teacher), cfg.teacher,
                              layer=cfg.teacher_layer, module=cfg.teacher_module,
                              clean_input=cfg.teacher_input == 'clean', fixed_t=cfg.t, fixed=cfg.policy == 'fixed',
                              t_bins=cfg.t_bins)
        img_size = _img_size(cfg, teacher)
        result: Dict[str, Any] = {}
        previous = None
        if cfg.epochs > 0:
            c1 = dataclasses.replace(cfg, out=str(out / 'distill'))
            r1 = session.stage(c1, lambda n: Distillation(c1, 'distill', teacher, img_size, n, None, out,
                                                          last=cfg.task_epochs == 0))
            previous, result['distill'] = r1.trained, str(r1.weights)
        student = r1.trained['student'] if cfg.epochs > 0 else None
        if cfg.task_epochs > 0:
            c2 = dataclasses.replace(cfg, out=str(out / 'task'), epochs=cfg.task_epochs)
            r2 = session.stage(c2, lambda n: Distillation(c2, 'task', teacher, img_size, n, previous, out, last=True))
            result['task'], student = str(r2.weights), r2.trained['student']
        result['student'] = str(out / 'student')
        if cfg.task_epochs > 0:  # a student fine-tuned on the labels: its accuracy is the number it is run for
            result['student_top1'] = _test_top1(student, cfg, img_size, session, 'the student')
        if cfg.scratch_baseline and cfg.task_epochs > 0 and cfg.epochs > 0:
            c3 = dataclasses.replace(cfg, out=str(out / 'scratch'), epochs=cfg.task_epochs, task_kd_weight=0.0)
            r3 = session.stage(c3, lambda n: Distillation(c3, 'task', None, img_size, n, None, out / 'scratch',
                                                          last=True))
            result['scratch_top1'] = _test_top1(r3.trained['student'], cfg, img_size, session,
                                                'the same student from scratch')
        if session.rank == 0:
            (out / 'results.json').write_text(json.dumps(result, indent=1) + '\n')
    return result


def _test_top1(student: Any, cfg: DistillConfig, img_size: int, session: Session, what: str) -> Optional[float]:
    """The student's top-1 (%) on the data set's test split (every process its share), printed; None without one."""
    from ...data import open_split, split_exists
    from ...probe import classifier_top1
    if not split_exists(cfg.dataset, cfg.data_root, 'test'):
        print(f'{what}: no test split in {cfg.data_root}: no accuracy to report', flush=True)
        return None
    test = open_split(cfg.dataset, cfg.data_root, 'test', download=cfg.download)
    top1 = classifier_top1(student, test, img_size, session.device, rank=session.rank, world=session.world,
                           workers=cfg.workers, progress=session.rank == 0 and not cfg.quiet)
    if session.rank == 0:
        print(json.dumps(dict(event='test', model=what, top1=round(top1, 2), images=len(test))), flush=True)
    return top1
