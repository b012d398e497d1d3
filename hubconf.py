"""torch.hub entry points: ``torch.hub.load('<repo or local dir>', 'ldae_vit_l', pretrained=False)``."""
dependencies = ['torch', 'timm', 'safetensors', 'huggingface_hub']

from ldae_models.models.ldae_vit import (  # noqa: E402,F401  (entry points are the registered timm functions)
    ldae_vit_b, ldae_vit_base_patch16_256, ldae_vit_half_l, ldae_vit_halflarge_patch16_256, ldae_vit_l,
    ldae_vit_large_patch16_256, ldae_vit_small_patch4_32, ldae_vit_tiny_patch4_32,
)
