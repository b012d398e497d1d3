"""Training recipes as data: the paper's l-DAE runs (and the shipped CIFAR-10 one), every value with its source.

``RECIPES[name]`` maps ``TrainConfig`` fields to a ``Setting(value, source)``: the paper's section for what the paper
states (App. A of *Deconstructing Denoising Diffusion Models for Self-Supervised Learning*), "ours" with the reason
for what it leaves open. ``train_config(name, gpu_mem_gb=80, world=1, **overrides)`` resolves a recipe into a
``TrainConfig``: the overrides (the command line's flags) win, and the micro-batch per GPU is chosen to fit
``gpu_mem_gb`` by ``memory.plan_memory`` (``--micro-batch`` fixes it instead). The global batch is the recipe's for
any number of GPUs: ``accum_steps = batch / (world x micro-batch)``.

    ldae-models train --recipe ldae_vit_b_in1k --data-root IMAGENET --out runs/b          # resolved config printed
    torchrun --nproc_per_node 8 -m ldae_models train --recipe ldae_vit_large_in1k --gpu-mem-gb 40 ...
"""
from dataclasses import dataclass
from typing import Any, Dict

from ..engine import ADAMW_BETAS_SOURCE
from .memory import plan_memory

__all__ = ['Setting', 'RECIPES', 'DISTILL_RECIPES', 'train_config', 'distill_config', 'recipe_table']


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str


_PAPER = dict(
    batch_size=Setting(2048, 'App. A'),
    blr=Setting(1e-4, 'App. A (lr = blr x batch / 256)'),
    weight_decay=Setting(0.0, 'App. A'),
    epochs=Setting(400, 'App. A (Tab. 5 also trains 800 and 1600)'),
    warmup_epochs=Setting(100, 'App. A'),
    aug=Setting('center', 'App. A: center crop (random resized crop reads +0.5)'),
    ema=Setting(0.0, 'ours: App. A names no EMA for pre-training (App. B\'s EMA is for fine-tuning)'),
    dataset=Setting('folder', 'ImageNet-1k as an ImageFolder (ROOT/train)'),
)

RECIPES: Dict[str, Dict[str, Setting]] = {
    'ldae_vit_b_in1k': dict(model=Setting('ldae_vit_base_patch16_256', 'Sec. 5: ViT-B, 12 + 12 blocks, d = 32 (60.3)'),
                            **_PAPER),
    'ldae_vit_halflarge_in1k': dict(model=Setting('ldae_vit_halflarge_patch16_256',
                                                  'Sec. 5: ViT-1/2L, width 1024, 12 + 12 blocks (65.0)'), **_PAPER),
    'ldae_vit_large_in1k': dict(model=Setting('ldae_vit_large_patch16_256',
                                              'Sec. 5: ViT-L, 24 + 24 blocks (70.9)'), **_PAPER),
    'ldae_vit_tiny_cifar10': dict(
        model=Setting('ldae_vit_tiny_patch4_32', 'ours: a ViT-Ti/4 for 32 px images'),
        dataset=Setting('cifar10', "ours: torchvision's CIFAR-10"),
        batch_size=Setting(128, "ours: the shipped checkpoint's run (a 2-core CPU)"),
        blr=Setting(1.2e-3, "ours: the shipped checkpoint's run (lr 6e-4 at batch 128)"),
        weight_decay=Setting(0.0, 'App. A'),
        epochs=Setting(4, "ours: the shipped checkpoint's CPU budget"),
        warmup_epochs=Setting(0.25, 'ours: App. A\'s quarter of the schedule, scaled to 4 epochs'),
        aug=Setting('center', 'App. A'),
        ema=Setting(0.0, 'ours'),
    ),
}
# RepFusion's official CIFAR-10 run (Adamdad/Repfusion, mmcls configs; the paper's Tab. 1 reads 95.38% for ResNet-18).
_OFFICIAL = 'the official code'
DISTILL_RECIPES: Dict[str, Dict[str, Setting]] = {
    'repfusion_cifar10': dict(
        dataset=Setting('cifar10', "CIFAR-10 (torchvision's files)"),
        teacher=Setting('ddae_ddpm_cifar10_32.google', f'{_OFFICIAL}: google/ddpm-cifar10-32 (Ho et al.)'),
        teacher_module=Setting('mid.1.res.conv2', f'{_OFFICIAL}: mid_block.resnets.1.conv2, 4 x 4 x 256, pooled'),
        teacher_input=Setting('clean', f'{_OFFICIAL}: the clean image, t as conditioning'),
        student=Setting('resnet18_cifar', f'{_OFFICIAL}: CIFAR ResNet-18 (3x3 stem, no max-pool)'),
        student_layer=Setting(None, f'{_OFFICIAL}: layer4.1.relu pooled, which is the pooled pre-logits'),
        policy=Setting('reinforce', f'{_OFFICIAL}: REINFORCE, reward -CE of the task head'),
        policy_net=Setting('lenet', f'{_OFFICIAL}: PolicyNet_Cov'),
        task_head=Setting('official', f'{_OFFICIAL}: Linear 256-256-256-10'),
        reward_baseline=Setting('none', f'{_OFFICIAL}: no baseline'),
        t_bins=Setting(1000, f'{_OFFICIAL}: a softmax over the 1000 steps'),
        entropy_weight=Setting(0.1, f'{_OFFICIAL}'),
        entropy_decay=Setting(0.5, f'{_OFFICIAL}: to 0 by epoch 100 of 200'),
        kd_loss=Setting('mse', f'{_OFFICIAL}: l2 on pooled features'),
        kd_weight=Setting(1.0, "ours: the official configs set kd_weight per run; 1 is its code's default"),
        aug=Setting('pad_crop', f'{_OFFICIAL}: random crop with 4 px padding + flip (the padding black; ours: '
                                'padded after normalising, the same black)'),
        opt=Setting('sgd', f'{_OFFICIAL}: SGD'),
        lr=Setting(0.1, f'{_OFFICIAL}: 0.1 at batch 128'),
        momentum=Setting(0.9, f'{_OFFICIAL}'),
        weight_decay=Setting(1e-4, f'{_OFFICIAL}'),
        lr_milestones=Setting([100, 150], f'{_OFFICIAL}: x0.1 at epochs 100 and 150'),
        warmup_epochs=Setting(0, f'{_OFFICIAL}: no warmup'),
        batch_size=Setting(128, f'{_OFFICIAL}: 128 x 1 GPU'),
        epochs=Setting(200, f'{_OFFICIAL}: 200 epochs of distillation'),
        task_epochs=Setting(200, f'{_OFFICIAL}: 200 epochs on the labels'),
        ema=Setting(0.999, f'{_OFFICIAL}: EMA 0.999'),
    ),
}


def _resolve(table: Dict[str, Dict[str, Setting]], name: str, what: str, overrides: Dict[str, Any]):
    """(values, provenance) of recipe ``name`` of ``table`` with ``overrides`` on top (their provenance: "flag")."""
    if name not in table:
        raise ValueError(f'unknown recipe {name!r}; {what} are: {", ".join(table)}')
    values = {k: s.value for k, s in table[name].items()}
    provenance = {k: s.source for k, s in table[name].items()}
    values.update(overrides)
    provenance.update({k: 'flag' for k in overrides})
    return values, provenance


def train_config(name: str, gpu_mem_gb: float = 80.0, world: int = 1, micro_batch: int = 0, **overrides: Any):
    """The ``TrainConfig`` of recipe ``name`` with ``overrides`` (field: value) on top, its micro-batch planned for
    ``world`` GPUs of ``gpu_mem_gb`` GB (unless ``accum_steps`` is overridden); its ``provenance`` names where every
    value comes from ("flag" for an override, "plan" for the memory plan)."""
    from .pretrain import TrainConfig
    values, provenance = _resolve(RECIPES, name, 'the recipes', overrides)
    if 'accum_steps' not in overrides:
        plan = plan_memory(values['model'], values['batch_size'], world, gpu_mem_gb, ema=bool(values.get('ema')),
                           micro_batch=micro_batch)
        values['accum_steps'] = plan['accum_steps']
        provenance['accum_steps'] = (f'plan: micro-batch {plan["micro_batch"]} of {plan["per_gpu_batch"]} per GPU, '
                                     f'about {plan["planned_gb"]} GB of {gpu_mem_gb:g}')
        if 'grad_checkpointing' not in overrides:
            values['grad_checkpointing'] = plan['grad_checkpointing']
            provenance['grad_checkpointing'] = 'plan'
    provenance['adamw_betas'] = ADAMW_BETAS_SOURCE
    return TrainConfig(**values, provenance=provenance)


def distill_config(name: str, **overrides: Any):
    """The ``DistillConfig`` of RepFusion recipe ``name`` with ``overrides`` on top, with its ``provenance``."""
    from .repfusion import DistillConfig
    values, provenance = _resolve(DISTILL_RECIPES, name, 'the distillation recipes', overrides)
    return DistillConfig(**values, provenance=provenance)


def recipe_table(recipes: Dict[str, Dict[str, Setting]] = RECIPES) -> str:
    """Recipes as a Markdown table (field: value (source)), as the README shows them."""
    names = list(recipes)
    fields = sorted({f for r in recipes.values() for f in r}, key=lambda f: (f not in ('model', 'teacher'), f))
    lines = ['| field | ' + ' | '.join(f'`{n}`' for n in names) + ' |', '|---' * (len(names) + 1) + '|']
    for f in fields:
        cells = [f'{recipes[n][f].value} ({recipes[n][f].source})' if f in recipes[n] else '' for n in names]
        lines.append(f'| `{f}` | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
