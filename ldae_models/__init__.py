"""ldae-models: denoising-based self-supervised vision encoders for timm.

``import ldae_models`` registers the models with timm; then ``timm.create_model('ldae_vit_l')``.
"""
from .features import extract_features
from .layers import PatchPCA
from .models import (DDAE_DIT_PRESET, AdaLNViT, DDAEUNet, UNet, DiffusionInput, DiT, DiTEncoder, LDAEEncoder, LatentDAE, create_dae,
                     create_dit, list_daes, list_dits)
from .pretrained import (CheckpointError, CheckpointMismatchError, ChecksumError, export_timm, load_pretrained,
                         push_to_hub, read_checkpoint, save_pretrained)

__version__ = '0.1.0'

__all__ = ['DDAEUNet', 'UNet', 'DDAE_DIT_PRESET', 'DiT', 'DiTEncoder', 'DiffusionInput', 'create_dit', 'list_dits', 'AdaLNViT', 'LDAEEncoder', 'LatentDAE', 'PatchPCA', 'create_dae', 'extract_features', 'list_daes',
           'CheckpointError', 'CheckpointMismatchError', 'ChecksumError', 'export_timm', 'load_pretrained',
           'push_to_hub', 'read_checkpoint', 'save_pretrained', '__version__']
