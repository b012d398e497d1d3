"""ldae-models: denoising-based self-supervised vision encoders for timm.

``import ldae_models`` registers the models with timm; then ``timm.create_model('ldae_vit_l')``.
"""
from .features import extract_features
from .hub import (
    CheckpointError, CheckpointMismatchError, ChecksumError, export_timm, load_pretrained, push_to_hub,
    read_checkpoint, save_pretrained,
)
from .layers import NoiseSchedule, PatchPCA, create_schedule
from .models import (
    DDAE_DIT_PRESET, AdaLNViT, DDAEUNet, DiffusionInput, DiT, DiTEncoder, FeatureExtractor, LDAEEncoder, LatentDAE,
    MergedViT, UNet, as_extractor, create_dae, create_dit, has_weights, list_models,
)

__version__ = '0.2.0'

__all__ = [
    # l-DAE
    'LatentDAE', 'LDAEEncoder', 'PatchPCA', 'create_dae',
    # DiT
    'DiT', 'DiTEncoder', 'DiffusionInput', 'DDAE_DIT_PRESET', 'create_dit',
    # DDAE UNets
    'UNet', 'DDAEUNet',
    # shared: the encoder contract, schedules, the zoo
    'FeatureExtractor', 'AdaLNViT', 'MergedViT', 'as_extractor', 'extract_features', 'NoiseSchedule',
    'create_schedule', 'list_models', 'has_weights',
    # weights
    'CheckpointError', 'CheckpointMismatchError', 'ChecksumError', 'export_timm', 'load_pretrained', 'push_to_hub',
    'read_checkpoint', 'save_pretrained',
    '__version__',
]
