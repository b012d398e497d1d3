"""The CIFAR ResNets of RepFusion's official recipe (and of most CIFAR papers), as timm models: timm's ``ResNet`` with
the 3x3, stride-1 stem and no max-pool, so that a 32 px image keeps 32 x 32 through the first stage and reaches the
last stage at 4 x 4 (timm's ImageNet stem leaves 1 x 1 there).

    timm.create_model('resnet18_cifar', num_classes=10)     # 11.17M parameters; input (3, 32, 32) in [-1, 1]

Everything else is timm's ResNet (``forward_features``, ``forward_head``, ``features_only``, ``reset_classifier``,
``set_grad_checkpointing``), with the feature reductions of this stem (1, 1, 2, 4, 8). No pretrained weights.
"""
from typing import Any

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet

__all__ = ['CifarResNet']


class CifarResNet(ResNet):
    """timm's ``ResNet`` with a CIFAR stem: conv 3x3 stride 1 (``stem_width`` channels), BN, ReLU, no max-pool."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        in_chans, width = self.conv1.in_channels, self.conv1.out_channels
        dd = dict(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype)
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False, **dd)
        self.maxpool = nn.Identity()
        for info in self.feature_info:  # the stem no longer halves twice: every reduction is 4 times smaller
            info['reduction'] = max(1, info['reduction'] // 4)


def _cfg(**kwargs: Any) -> dict:
    return dict(url='', num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
                interpolation='bicubic', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv='conv1',
                classifier='fc', license='apache-2.0', **kwargs)


default_cfgs = generate_default_cfgs({'resnet18_cifar': _cfg(), 'resnet34_cifar': _cfg()})


def _create(variant: str, depths: tuple, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    layers = tuple(kwargs.pop('layers', depths))  # a shallower or deeper variant: layers=[1, 1, 1, 1]
    if pretrained:
        raise ValueError(f'{variant} has no pretrained weights (train one: ldae-models distill --student {variant})')
    return build_model_with_cfg(CifarResNet, variant, pretrained=False, block=BasicBlock, layers=layers, **kwargs)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 for 32 px images (RepFusion's student; He et al.'s layout with the CIFAR stem)."""
    return _create('resnet18_cifar', (2, 2, 2, 2), pretrained, **kwargs)


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-34 for 32 px images."""
    return _create('resnet34_cifar', (3, 4, 6, 3), pretrained, **kwargs)
