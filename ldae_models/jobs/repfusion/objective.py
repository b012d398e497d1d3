"""RepFusion's objective on the training loop: one stage, the distillation (``'distill'``) or the task (``'task'``).

Trained parts (``parts``, what is checkpointed and exported): the timm ``student``; while distilling, a linear
``projector`` from the student's feature to the teacher's width, the timestep ``policy`` and, for a learned policy,
its ``task_head`` and reward ``baseline``; ``t_log``, the counts of the chosen t in each tenth of the stage.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...engine import Objective
from ...layers.schedules import randn
from .parts import KD_LOSSES, POLICIES, TASK_HEADS, MovingBaseline, pool, reinforce_loss
from .teacher import Teacher

__all__ = ['Distillation', 'TimestepLog', 'HIST_BINS']

HIST_BINS = 10  # the histogram of t: tenths of the teacher's range
HIST_ROWS = 10  # ... in each tenth of the stage


class TimestepLog(nn.Module):
    """Counts of the chosen t (tenths of the teacher's range) in each tenth of a stage: a buffer, so that a resumed
    run keeps the counts of the steps before its checkpoint (under torchrun: process 0's share, a sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer('counts', torch.zeros(HIST_ROWS, HIST_BINS, dtype=torch.long))

    def rows(self) -> List[Dict[str, Any]]:
        return [dict(stage_fraction=[r / HIST_ROWS, (r + 1) / HIST_ROWS], t_hist=c)
                for r, c in enumerate(self.counts.tolist())]


class Distillation(Objective):
    """One stage of RepFusion (see the module docstring).

    Args:
        cfg: the stage's ``DistillConfig``.
        stage: ``'distill'`` (the distillation loss, ``kd_weight``; a learned policy by REINFORCE) or ``'task'``
            (cross-entropy on the labels, plus ``task_kd_weight`` of the distillation loss).
        teacher: the ``Teacher`` (None when the stage does not distil).
        img_size: the side of the images (the teacher's).
        num_classes: the data's classes (the student's head).
        previous: the previous stage's parts (in memory): every part both stages have starts from it, loaded strictly.
        run_dir: the run's folder, where the last stage writes the student, the policy and the histogram.
        last: whether this is the run's last stage.
    """

    unused_parameters = True  # the student's classifier (and what follows --student-layer) gets no gradient in stage 1

    def __init__(self, cfg: Any, stage: str, teacher: Optional[Teacher], img_size: int, num_classes: int,
                 previous: Optional[nn.ModuleDict], run_dir: Path, last: bool) -> None:
        super().__init__()
        import timm
        if stage not in ('distill', 'task'):
            raise ValueError(f"stage must be 'distill' or 'task', got {stage!r}")
        self.cfg, self.stage, self.img_size, self.num_classes = cfg, stage, img_size, num_classes
        self.run_dir, self.last = Path(run_dir), last
        self.kd_weight = cfg.kd_weight if stage == 'distill' else cfg.task_kd_weight
        self.ce_weight = 0.0 if stage == 'distill' else 1.0
        self.learn_policy = stage == 'distill' and cfg.policy == 'reinforce'
        self.distils = bool(self.kd_weight) or self.learn_policy
        self.progress = 0.0
        self.register_buffer('t_hist', torch.zeros(HIST_BINS, dtype=torch.long), persistent=False)
        self.register_buffer('kd_sum', torch.zeros(2), persistent=False)  # (sum of kd losses, count) since the log

        student = timm.create_model(cfg.student, num_classes=num_classes, **cfg.student_args)
        self.parts = nn.ModuleDict(dict(student=student))
        self._hooked: List[torch.Tensor] = []
        if cfg.student_layer:
            modules = dict(student.named_modules())
            if cfg.student_layer not in modules:
                near = [n for n in modules if n and cfg.student_layer.split('.')[0] in n][:8]
                raise ValueError(f'the student {cfg.student} has no module {cfg.student_layer!r}'
                                 + (f'; modules with that prefix: {near}' if near else '; see model.named_modules()'))
            modules[cfg.student_layer].register_forward_hook(lambda m, i, o: self._hooked.append(o))
        self.teacher = teacher if self.distils else None
        if self.distils:
            if teacher is None:
                raise ValueError('this stage distils: it needs a teacher')
            self.parts['projector'] = nn.Linear(self._student_width(), teacher.width(img_size))
            self.kd_loss = KD_LOSSES[cfg.kd_loss]
            self.parts['policy'] = POLICIES[cfg.policy](teacher.grid.cpu(), net=cfg.policy_net, img_size=img_size)
            self.parts['policy'].requires_grad_(self.learn_policy)
            self.parts['t_log'] = TimestepLog()
            if self.learn_policy:
                self.parts['task_head'] = TASK_HEADS[cfg.task_head](teacher.width(img_size), num_classes)
                if cfg.reward_baseline == 'moving':
                    self.parts['baseline'] = MovingBaseline(cfg.baseline_momentum)
        if previous is not None:
            self._start_from(previous)

    def _start_from(self, previous: nn.ModuleDict) -> None:
        """Every part both stages have (the student always; not the stage's own t counts) loaded strictly, so that a
        student of another shape fails with the hub's mismatch error, never a silent partial load."""
        from ...hub import load_state_dict_strict
        for name, part in self.parts.items():
            if name == 't_log' or (name not in previous and name != 'student'):
                continue
            load_state_dict_strict(part, previous[name].state_dict(), what=f'the distillation stage ({name})')

    @torch.no_grad()
    def _student_width(self) -> int:
        student = self.parts['student']
        was = student.training
        student.eval()
        width = self.student_features(torch.zeros(2, 3, self.img_size, self.img_size))[0].shape[1]
        student.train(was)
        return width

    @property
    def trained(self) -> nn.Module:
        return self.parts

    def student_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the distilled feature, the logits) of the student."""
        student = self.parts['student']
        if self.cfg.student_layer:
            self._hooked.clear()
            logits = student(x)
            return pool(self._hooked[-1]), logits
        feats = student.forward_features(x)
        return student.forward_head(feats, pre_logits=True), student.forward_head(feats)

    # -- the loop's hooks --------------------------------------------------------------------------------------------
    def draws(self, generator: torch.Generator, batch: int, device: torch.device) -> Dict[str, torch.Tensor]:
        if not self.distils:
            return {}
        return dict(u=torch.rand(batch, generator=generator, device=device),
                    noise=randn((batch, *self.teacher.noise_shape), generator=generator, device=device))

    def begin_step(self, step: int, total_steps: int) -> None:
        self.progress = step / max(1, total_steps)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, u: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        feat, logits = self.student_features(images)
        loss = images.new_zeros((), dtype=torch.float32)
        if self.ce_weight:
            loss = loss + self.ce_weight * F.cross_entropy(logits.float(), labels)
        if not self.distils:
            return loss
        t, logp, entropy = self.parts['policy'](images, u)  # (t, log-prob, entropy); no log-prob unless learned
        target = self.teacher(images, t, noise)
        kd = self.kd_loss(self.parts['projector'](feat).float(), target)
        loss = loss + self.kd_weight * kd
        with torch.no_grad():
            bins = torch.bincount((t / self.teacher.num_timesteps * HIST_BINS).long().clamp(0, HIST_BINS - 1),
                                  minlength=HIST_BINS)
            self.t_hist += bins
            self.parts['t_log'].counts[min(HIST_ROWS - 1, int(self.progress * HIST_ROWS))] += bins
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
        if not self.distils:
            return {}
        counts = self.t_hist.tolist()
        kd = (self.kd_sum[0] / self.kd_sum[1].clamp(min=1)).item()
        self.t_hist.zero_()
        self.kd_sum.zero_()
        rec = dict(kd=round(kd, 6), t_hist=counts)
        if 'baseline' in self.parts:
            rec['baseline'] = round(self.parts['baseline'].value.item(), 4)
        return rec

    def export(self, trained: nn.Module, out: Path) -> Path:
        """The stage's parts (``OUT/<stage>/model.safetensors``); a distillation stage also writes the run's policy
        and t histogram, and the last stage the student (``OUT/student``)."""
        from ...hub.publish import save_safetensors
        path = save_safetensors(trained.state_dict(), out / 'model.safetensors',
                                metadata={'stage': self.stage, 'student': self.cfg.student})
        if self.stage == 'distill' and 't_log' in trained:
            rows = trained['t_log'].rows()
            (self.run_dir / 't_histogram.json').write_text(json.dumps(dict(policy=self.cfg.policy, bins=HIST_BINS,
                                                                           rows=rows), indent=1))
            from ...plots import t_histogram_figure
            t_histogram_figure(rows, self.run_dir / 't_histogram.png', self.cfg.policy)
            if self.learn_policy:
                save_safetensors(trained['policy'].net.state_dict(), self.run_dir / 'policy.safetensors',
                                 metadata={'t_bins': str(self.cfg.t_bins), 'net': self.cfg.policy_net})
        if self.last:
            export_student(trained['student'], self.cfg, self.num_classes, self.img_size, self.run_dir / 'student')
        return path


def export_student(student: nn.Module, cfg: Any, num_classes: int, img_size: int, out: Path) -> Path:
    """The student alone, as a ``save_pretrained`` folder that plain timm loads, with the data config of what it was
    trained on (images in [-1, 1] at the teacher's size, no crop)."""
    import copy
    import dataclasses
    from ...hub.publish import save_pretrained
    student = copy.deepcopy(student).cpu()
    student.pretrained_cfg = {k: v for k, v in dict(student.pretrained_cfg).items() if not k.startswith('test_')}
    student.pretrained_cfg.update(input_size=(3, img_size, img_size), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    return save_pretrained(student, out, architecture=cfg.student,
                           model_args=dict(cfg.student_args, num_classes=num_classes),
                           model_card=dict(description=f'{cfg.student} distilled from {cfg.teacher} by RepFusion '
                                                       f'(ldae-models distill, policy {cfg.policy}).',
                                           training={k: v for k, v in dataclasses.asdict(cfg).items()
                                                     if k not in ('data_root', 'out')}))
