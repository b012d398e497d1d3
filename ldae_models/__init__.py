"""ldae-models: denoising-based self-supervised vision encoders for timm.

``import ldae_models`` registers the models with timm; then ``timm.create_model('ldae_vit_l')``.
"""
from .features import extract_features
from .layers import PatchPCA
from .models import AdaLNViT, LDAEEncoder, LatentDAE, create_dae, list_daes
from .pretrained import (CheckpointError, CheckpointMismatchError, ChecksumError, export_timm, load_pretrained,
                         push_to_hub, read_checkpoint, save_pretrained)

__version__ = '0.1.0'

__all__ = ['AdaLNViT', 'LDAEEncoder', 'LatentDAE', 'PatchPCA', 'create_dae', 'extract_features', 'list_daes',
           'CheckpointError', 'CheckpointMismatchError', 'ChecksumError', 'export_timm', 'load_pretrained',
           'push_to_hub', 'read_checkpoint', 'save_pretrained', '__version__']
