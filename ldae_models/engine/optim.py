"""The optimizer and the learning-rate schedule of every run of the zoo: training, distillation and both probes."""
import math
from typing import Any, Dict, Sequence, Set

import torch
import torch.nn as nn

__all__ = ['lr_at', 'build_optimizer', 'no_weight_decay_names', 'ADAMW_BETAS', 'ADAMW_BETAS_SOURCE']

# AdamW-family betas of every run (a recipe records them with this source)
ADAMW_BETAS = (0.9, 0.95)
ADAMW_BETAS_SOURCE = "ours: MAE's; App. A states none (DiT keeps PyTorch's 0.999)"


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float = 0.0,
          milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """The lr at ``step`` of ``total``: a linear warmup over ``warmup`` steps, then a half-cycle cosine to ``min_lr``
    (the l-DAE paper's schedule, MAE's probe's); with ``milestones`` (steps), a step decay instead: the peak times
    ``gamma`` for each milestone passed (RepFusion's official SGD schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if milestones:
        return peak * gamma ** sum(step >= m for m in milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def no_weight_decay_names(model: nn.Module) -> Set[str]:
    """The parameters a model and every module inside it name in ``no_weight_decay()`` (position embeddings, class
    tokens, ...), as full names: a student inside RepFusion's parts keeps its exemptions."""
    names: Set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, 'no_weight_decay', None)
        if callable(fn):
            names |= {f'{prefix}.{n}' if prefix else n for n in fn()}
    return names

def build_optimizer(model: nn.Module, cfg: Any, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer, built by timm (``create_optimizer_v2``): weight decay in one group, and none on 1-D
    parameters (norms, biases) and on what ``no_weight_decay()`` names; frozen parameters left out. AdamW-family
    optimizers take ``ADAMW_BETAS``, fused on a GPU; LARS applies its trust ratio to the decayed group (the weight
    matrices) only, as MAE's ``util/lars.py`` does."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    kw: Dict[str, Any] = {}
    if cfg.opt.lower() in ('lars', 'nlars'):  # LARS adapts the matrices only, with or without weight decay (MAE's)
        groups = [dict(g, params=ps, always_adapt=adapt) for g in groups
                  for adapt, ps in ((True, [p for p in g['params'] if p.ndim > 1]),
                                    (False, [p for p in g['params'] if p.ndim <= 1])) if ps]
    if cfg.opt.lower() in ('adamw', 'adam', 'nadamw', 'lamb', 'adan'):
        kw['betas'] = ADAMW_BETAS
    if cfg.opt.lower() in ('adamw', 'adam') and device.type == 'cuda':
        kw['fused'] = True
    try:
        return create_optimizer_v2(groups, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                   **kw)
    except (AssertionError, ValueError) as e:  # timm's refusal of an unknown name
        raise ValueError(f'--opt {cfg.opt!r}: {e}; timm.optim.list_optimizers() lists the names') from None
