"""RepFusion (Yang and Wang, arXiv 2308.10916): a diffusion teacher distilled into any timm student, t chosen by a
policy: ``run.py`` (the config and the two stages), ``objective.py`` (a stage on the training loop), ``teacher.py``
(the teacher and what is read of it), ``parts.py`` (policies, policy networks, task heads, losses as tables)."""
from .objective import Distillation
from .parts import KD_LOSSES, POLICIES, POLICY_NETS, TASK_HEADS
from .run import DistillConfig, distill
from .teacher import Teacher, load_teacher

__all__ = ['DistillConfig', 'distill', 'Distillation', 'Teacher', 'load_teacher', 'KD_LOSSES', 'POLICIES',
           'POLICY_NETS', 'TASK_HEADS']
