"""ldae-models: denoising-based self-supervised vision encoders for timm.

``import ldae_models`` registers the models with timm; then ``timm.create_model('ldae_vit_l')``.
"""
from .features import ddae_grid_features, extract_features
from .layers import PatchPCA
from .models import (
    DDAE_DIT_PRESET, AdaLNViT, DDAEUNet, DiffusionInput, DiT, DiTEncoder, LDAEEncoder, LatentDAE, UNet, create_dae,
    create_dit, list_daes, list_dits,
)
from .pretrained import (
    CheckpointError, CheckpointMismatchError, ChecksumError, export_timm, load_pretrained, push_to_hub,
    read_checkpoint, save_pretrained,
)

__version__ = '0.1.0'

__all__ = [
    # l-DAE
    'LatentDAE', 'LDAEEncoder', 'PatchPCA', 'create_dae', 'list_daes',
    # DiT
    'DiT', 'DiTEncoder', 'DiffusionInput', 'DDAE_DIT_PRESET', 'create_dit', 'list_dits',
    # DDAE UNets
    'UNet', 'DDAEUNet',
    # shared
    'AdaLNViT', 'extract_features', 'ddae_grid_features',
    # weights
    'CheckpointError', 'CheckpointMismatchError', 'ChecksumError', 'export_timm', 'load_pretrained', 'push_to_hub',
    'read_checkpoint', 'save_pretrained',
    '__version__',
]
