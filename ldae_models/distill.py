"""RepFusion: a diffusion teacher's features distilled into any timm student, the timestep chosen by a learned policy.

*Diffusion Model as Representation Learner* (Yang and Wang, arXiv 2308.10916). Two stages, each a run of the zoo's
training engine (``engine.run``: one process or torchrun, exact resume, bf16, seeds):

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
   ``task_kd_weight`` (default 0); it starts from stage 1's weights, loaded strictly. ``epochs=0`` skips stage 1: a
   student trained from scratch, the baseline.

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
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine import Objective, RunConfig, process_group, run, undo_on_failure
from .engine.config import arg
from .models.extractor import FeatureExtractor
from .repfusion import KD_LOSSES, POLICIES, POLICY_NETS, TASK_HEADS, MovingBaseline, pool as _pool, reinforce_loss

__all__ = ['DistillConfig', 'Distillation', 'distill', 'load_teacher']

HIST_BINS = 10  # the logged histogram of t: tenths of the teacher's range


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
    # RunConfig defaults that differ for a supervised student
    epochs: int = arg(100, 'epochs of stage 1, the distillation (0: none; the student is trained from scratch)', min=0)
    batch_size: int = arg(128, 'global batch', min=1)
    blr: float = arg(2e-3, 'base lr: lr = blr * batch / 256', min=0)
    warmup_epochs: float = arg(5, 'linear warmup epochs of each stage, then half-cycle cosine to 0', min=0)
    weight_decay: float = arg(0.05, 'weight decay (spares norms, biases and no_weight_decay())', min=0)


class Distillation(Objective):
    """One stage of RepFusion as an objective of the zoo's training loop (see the module docstring)."""

    unused_parameters = True  # the student's classifier (and what follows --student-layer) gets no gradient in stage 1

    def __init__(self, cfg: DistillConfig, stage: str, teacher: Optional[nn.Module], img_size: int,
                 previous: Optional[Path] = None) -> None:
        super().__init__()
        self.previous = previous  # the previous stage's folder: its weights start this stage (loaded strictly)
        if stage not in ('distill', 'task'):
            raise ValueError(f"stage must be 'distill' or 'task', got {stage!r}")
        self.cfg, self.stage, self.img_size = cfg, stage, img_size
        self.kd_weight = cfg.kd_weight if stage == 'distill' else cfg.task_kd_weight
        self.ce_weight = 0.0 if stage == 'distill' else 1.0
        self.learn_policy = stage == 'distill' and cfg.policy == 'reinforce'
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.parts = nn.ModuleDict()
        self.register_buffer('t_hist', torch.zeros(HIST_BINS, dtype=torch.long), persistent=False)
        self.register_buffer('kd_sum', torch.zeros(2), persistent=False)  # (sum of kd losses, count) since the last log
        self.progress = 0.0
        self.num_classes = 0

    # -- construction (after the data: the student needs the number of classes) ------------------------------------
    def build(self, num_classes: int) -> None:
        import timm
        cfg = self.cfg
        self.num_classes = num_classes
        student = timm.create_model(cfg.student, num_classes=num_classes, **cfg.student_args)
        self.parts['student'] = student
        self._hooked: List[torch.Tensor] = []
        if cfg.student_layer:
            modules = dict(student.named_modules())
            if cfg.student_layer not in modules:
                near = [n for n in modules if n and cfg.student_layer.split('.')[0] in n][:8]
                raise ValueError(f'the student {cfg.student} has no module {cfg.student_layer!r}'
                                 + (f'; modules with that prefix: {near}' if near else '; see model.named_modules()'))
            modules[cfg.student_layer].register_forward_hook(lambda m, i, o: self._hooked.append(o))
        if self.kd_weight or self.learn_policy:
            if self.teacher is None:
                raise ValueError('this stage distils: it needs a teacher')
            self._check_teacher()
            tdim, sdim = self._dims()
            self.parts['projector'] = nn.Linear(sdim, tdim)
            self.kd_loss = KD_LOSSES[cfg.kd_loss]
            self.parts['policy'] = POLICIES[cfg.policy](self.grid, net=cfg.policy_net, img_size=self.img_size)
            if not self.learn_policy:
                self.parts['policy'].requires_grad_(False)
            if self.learn_policy:
                self.parts['task_head'] = TASK_HEADS[cfg.task_head](tdim, num_classes)
                if cfg.reward_baseline == 'moving':
                    self.parts['baseline'] = MovingBaseline(cfg.baseline_momentum)
        if self.previous is not None:
            self._load_previous()

    def _load_previous(self) -> None:
        """Start from the previous stage: every part both stages have (the student always) loaded strictly, so that a
        student of another shape fails with the hub's mismatch error, never a silent partial load."""
        from safetensors.torch import load_file
        from .hub.checkpoint import load_state_dict_strict
        path = self.previous / 'model.safetensors'
        state = load_file(str(path))
        for name, part in self.parts.items():
            theirs = {k.split('.', 1)[1]: v for k, v in state.items() if k.split('.', 1)[0] == name}
            if theirs or name == 'student':
                load_state_dict_strict(part, theirs, what=f'{path} ({name})')

    def _check_teacher(self) -> None:
        cfg, teacher = self.cfg, self.teacher
        if not isinstance(teacher, FeatureExtractor) or getattr(teacher, 'schedule', None) is None:
            raise ValueError(f'the teacher {cfg.teacher!r} is not a diffusion extractor of the zoo (an l-DAE, DiT or '
                             f'DDAE UNet with a noise schedule): got {type(teacher).__name__}')
        if teacher.fixed_t:
            raise ValueError(f'the teacher {cfg.teacher!r} is a merged encoder (one t); RepFusion needs the '
                             f'conditional one (merged=False)')
        self.t_module = None
        if cfg.teacher_module:
            modules = dict(teacher.named_modules())
            if cfg.teacher_module not in modules:
                near = [n for n in modules if n and n.startswith(cfg.teacher_module.split('.')[0])][:8]
                raise ValueError(f'the teacher {cfg.teacher} has no module {cfg.teacher_module!r}'
                                 + (f'; modules with that prefix: {near}' if near else '; see model.named_modules()'))
            self.t_module = modules[cfg.teacher_module]
        default = 0 if cfg.teacher_module else teacher.default_layer
        layer = default if cfg.teacher_layer is None else cfg.teacher_layer
        self.t_layer = teacher.resolve_layers(layer)[1][0]
        T = getattr(teacher.schedule, 'num_timesteps', None)
        if T is None:
            raise ValueError(f'the policy picks step indices; the teacher schedule {type(teacher.schedule).__name__} '
                             f'has none (use a step-index schedule: ddpm, linear_sigma)')
        if cfg.policy == 'fixed':
            t = teacher.t if cfg.t is None else cfg.t
            self.grid = teacher.resolve_ts([t])[0] * torch.ones(1)  # checked by the teacher's schedule
        else:
            if not 2 <= cfg.t_bins <= T:
                raise ValueError(f'--t-bins must be in [2, {T}] (the teacher has {T} steps), got {cfg.t_bins}')
            self.grid = torch.linspace(0, T - 1, cfg.t_bins).round()
        self.t_max = float(T)

    @torch.no_grad()
    def _dims(self) -> Tuple[int, int]:
        """(teacher width, student width), from one forward pass of each on two blank images."""
        x = torch.zeros(2, 3, self.img_size, self.img_size)
        student = self.parts['student']
        was = student.training
        student.eval()
        sdim = self.student_features(x)[0].shape[1]
        student.train(was)
        dev = next(self.teacher.parameters()).device
        tdim = self.teacher_features(x.to(dev), self.grid[:1].expand(2).to(dev), None).shape[1]
        return tdim, sdim

    # -- the two networks --------------------------------------------------------------------------------------------
    @property
    def trained(self) -> nn.Module:
        return self.parts

    def student_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the distilled feature, the logits) of the student."""
        student = self.parts['student']
        if self.cfg.student_layer:
            self._hooked.clear()
            logits = student(x)
            return _pool(self._hooked[-1]), logits
        feats = student.forward_features(x)
        return student.forward_head(feats, pre_logits=True), student.forward_head(feats)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """The teacher's pooled feature at (``teacher_layer``, t) per image (t: (B,) step indices, already checked)."""
        teacher = self.teacher
        x = teacher.encode_input(images)
        if self.cfg.teacher_input == 'noisy':
            x = teacher.noise_input(x, t, noise=noise)[0]
        if self.t_module is None:
            return _pool(teacher.tap(x, t, [self.t_layer])[0]).float()
        seen: List[torch.Tensor] = []
        hook = self.t_module.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
        try:
            teacher.tap(x, t, [self.t_layer])
        finally:
            hook.remove()
        if not seen:
            raise ValueError(f'the teacher module {self.cfg.teacher_module!r} does not run before block '
                             f'{self.t_layer}: raise --teacher-layer')
        return _pool(seen[-1]).float()

    # -- the loop's hooks ------------------------------------------------------------------------------------------
    def draws(self, generator: torch.Generator, batch: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if 'projector' not in self.parts:
            return {}
        if not hasattr(self, '_noise_shape'):
            with torch.no_grad():
                x0 = self.teacher.encode_input(x[:1])
                self._noise_shape = tuple(self.teacher.noise_input(x0, self.grid[:1].to(x.device))[1].shape[1:])
        from .layers.schedules import randn
        return dict(u=torch.rand(batch, generator=generator, device=x.device),
                    noise=randn((batch, *self._noise_shape), generator=generator, device=x.device))

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        total = max(1, self.cfg.max_steps or self.cfg.epochs * steps_per_epoch)
        self.progress = step / total

    def forward(self, images: torch.Tensor, labels: torch.Tensor, u: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        feat, logits = self.student_features(images)
        loss = images.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), labels)
        if 'projector' not in self.parts:
            return loss
        t, logp, entropy = self.parts['policy'](images, u)  # (t, log-prob, entropy); no log-prob unless learned
        target = self.teacher_features(images, t, noise)
        kd = self.kd_loss(self.parts['projector'](feat).float(), target)
        loss = loss + self.kd_weight * kd
        with torch.no_grad():
            self.t_hist += torch.bincount((t / self.t_max * HIST_BINS).long().clamp(0, HIST_BINS - 1),
                                          minlength=HIST_BINS)
            self.kd_sum += torch.stack([kd.detach(), torch.ones_like(kd)])
        if self.learn_policy:
            ce = F.cross_entropy(self.parts['task_head'](target), labels, reduction='none')
            reward = -ce.detach()
            beta = self.cfg.entropy_weight * max(0.0, 1.0 - self.progress / max(self.cfg.entropy_decay, 1e-9))
            baseline = self.parts['baseline'] if 'baseline' in self.parts else None
            b = baseline.value if baseline is not None else torch.zeros((), device=reward.device)
            loss = loss + ce.mean() + reinforce_loss(logp, entropy, reward, b, beta)
            if baseline is not None:
                baseline.update(reward)
        return loss

    def log_record(self) -> Dict[str, Any]:
        """The mean distillation loss and the counts of the chosen t since the last log (under torchrun: process 0's
        share of the batch, a sample of the whole)."""
        if 'projector' not in self.parts:
            return {}
        counts = self.t_hist.tolist()
        kd = (self.kd_sum[0] / self.kd_sum[1].clamp(min=1)).item()
        self.t_hist.zero_()
        self.kd_sum.zero_()
        rec = dict(kd=round(kd, 6), t_hist=counts)
        if 'baseline' in self.parts:
            rec['baseline'] = round(self.parts['baseline'].value.item(), 4)
        return rec

    def export(self, trained: nn.Module, cfg: RunConfig, out: Path) -> Path:
        from .hub.publish import save_safetensors
        path = out / 'model.safetensors'
        save_safetensors(trained.state_dict(), path, metadata={'stage': self.stage, 'student': self.cfg.student,
                            'num_classes': str(self.num_classes), 'img_size': str(self.img_size)})
        return path


def _check_student(name: str) -> None:
    """Refuse a student timm does not know, in one line with the nearest names."""
    import difflib
    import timm
    if name.startswith(('hf-hub:', 'local-dir:')) or timm.is_model(name):
        return
    near = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    raise ValueError(f'unknown student model {name!r}: timm has no such model'
                     + (f' (did you mean {", ".join(near)}?)' if near else "; timm.list_models('resnet*') lists names"))


def _img_size(cfg: DistillConfig, teacher: Optional[nn.Module]) -> int:
    """The image side of a run: the teacher's input size (the student gets the same images)."""
    if teacher is not None:
        cfg_ = getattr(teacher, 'pretrained_cfg', None) or {}
        if cfg_.get('input_size'):
            return int(cfg_['input_size'][-1])
    if 'img_size' in cfg.student_args:
        s = cfg.student_args['img_size']
        return int(s if isinstance(s, int) else s[-1])
    from .models import pretrained_cfg_for
    return int(pretrained_cfg_for(cfg.teacher)['input_size'][-1])


def load_teacher(cfg: DistillConfig) -> nn.Module:
    """The teacher a config names, always conditional (``merged=False``: t is RepFusion's choice), in eval mode. A name
    that asks for no weights (no tag, no checkpoint) is refused, naming the tags that have them, unless
    ``allow_random_teacher``."""
    from .models import load_model, names_weights, pretrained_cfg_for
    kwargs = dict(cfg.teacher_args)
    name = cfg.teacher
    if not name.startswith(('hf-hub:', 'local-dir:')):
        pretrained_cfg_for(name)  # an unknown model or tag: named, with the nearest names
    if not (names_weights(name) or kwargs.get('checkpoint') or cfg.allow_random_teacher):
        import timm
        tags = timm.list_pretrained(name.split('.')[0] + '.*')
        raise ValueError(f'the teacher {name!r} names no weights (a random network teaches nothing): name a '
                         f'pretrained tag' + (f', e.g. {", ".join(tags[:3])}' if tags else
                                              f' (none exists for {name}: pass teacher_args {{"checkpoint": FILE}})')
                         + '; --allow-random-teacher accepts it for a smoke run')
    try:
        teacher = load_model(name, merged=False, **kwargs)
    except TypeError as e:  # a family without a merged form (the UNets): conditional already
        if 'merged' not in str(e):
            raise
        teacher = load_model(name, **kwargs)
    return teacher.eval()


def distill(cfg: DistillConfig) -> Dict[str, Any]:
    """Run both stages (each resumable), then write ``OUT/student``, the policy and the t histogram."""
    if not cfg.out:
        raise ValueError('--out is required')
    if cfg.epochs < 0 or cfg.task_epochs < 0 or cfg.epochs + cfg.task_epochs == 0:
        raise ValueError('nothing to run: give --epochs (distillation) and/or --task-epochs (the task)')
    if cfg.max_steps:
        raise ValueError('distill runs whole epochs: --max-steps is not available (use --epochs, --task-epochs)')
    _check_student(cfg.student)
    with process_group(cfg.device) as (rank, _, _):  # one process group for both stages under torchrun
        with undo_on_failure(Path(cfg.out), enabled=rank == 0):
            return _distill(cfg, is_main=rank == 0)


def _distill(cfg: DistillConfig, is_main: bool) -> Dict[str, Any]:
    """The two stages and the files; process 0 (``is_main``) writes the files of the whole run."""
    out = Path(cfg.out)
    need_teacher = cfg.epochs > 0 or cfg.task_kd_weight > 0
    teacher = load_teacher(cfg) if need_teacher else None
    img_size = _img_size(cfg, teacher)
    result: Dict[str, Any] = {}
    stage1 = None
    if cfg.epochs > 0:
        stage1 = out / 'distill'
        c1 = dataclasses.replace(cfg, out=str(stage1))
        result['distill'] = run(c1, lambda: Distillation(cfg, 'distill', teacher, img_size))
        if is_main:
            _write_histogram(stage1 / 'log.jsonl', out, cfg)
    last = out / 'distill'
    if cfg.task_epochs > 0:
        last = out / 'task'
        c2 = dataclasses.replace(cfg, out=str(last), epochs=cfg.task_epochs)
        result['task'] = run(c2, lambda: Distillation(cfg, 'task', teacher, img_size, stage1))
    final = last / 'model.safetensors'
    if is_main and final.is_file():
        result['student'] = str(_export_student(cfg, final, out))
        if cfg.policy == 'reinforce' and stage1 is not None:
            from safetensors.torch import load_file
            from .hub.publish import save_safetensors
            state = load_file(str(stage1 / 'model.safetensors'))
            save_safetensors({k.split('policy.net.', 1)[1]: v for k, v in state.items() if k.startswith('policy.net.')},
                             out / 'policy.safetensors', metadata={'t_bins': str(cfg.t_bins), 'net': cfg.policy_net})
            result['policy'] = str(out / 'policy.safetensors')
    return result


def _export_student(cfg: DistillConfig, weights: Path, out: Path) -> Path:
    """``OUT/student``: the student alone, as a ``save_pretrained`` folder plain timm loads."""
    import timm
    from safetensors.torch import load_file
    from .hub.publish import save_pretrained
    from safetensors import safe_open
    with safe_open(str(weights), 'pt') as f:
        f_meta = f.metadata()
    num_classes = int(f_meta['num_classes'])
    state = {k.split('student.', 1)[1]: v for k, v in load_file(str(weights)).items() if k.startswith('student.')}
    student = timm.create_model(cfg.student, num_classes=num_classes, **cfg.student_args)
    student.load_state_dict(state)
    size = int(f_meta['img_size'])
    # the data config of what it was trained on: images in [-1, 1] at the teacher's size, no crop
    student.pretrained_cfg = {k: v for k, v in dict(student.pretrained_cfg).items() if not k.startswith('test_')}
    student.pretrained_cfg.update(input_size=(3, size, size), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    return save_pretrained(student, out / 'student', architecture=cfg.student,
                           model_args=dict(cfg.student_args, num_classes=num_classes),
                           model_card=dict(description=f'{cfg.student} distilled from {cfg.teacher} by RepFusion '
                                                       f'(ldae-models distill, policy {cfg.policy}).',
                                           training={k: v for k, v in dataclasses.asdict(cfg).items()
                                                     if k not in ('data_root', 'out')}))


def _write_histogram(log_path: Path, out: Path, cfg: DistillConfig) -> None:
    """``OUT/t_histogram.json`` (per log step: the counts of the chosen t in tenths of the range) and its plot."""
    if not log_path.is_file():
        return
    rows = [json.loads(x) for x in log_path.read_text().splitlines()]
    rows = [dict(step=r['step'], epoch=r['epoch'], t_hist=r['t_hist']) for r in rows if 't_hist' in r]
    (out / 't_histogram.json').write_text(json.dumps(dict(policy=cfg.policy, bins=HIST_BINS, rows=rows), indent=1))
    from .plots import t_histogram_figure
    t_histogram_figure(rows, out / 't_histogram.png', cfg.policy)
