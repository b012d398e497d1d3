"""Model families; importing this package registers every model with timm."""
from .adaln_vit import AdaLNViT
from .ldae_vit import LDAEEncoder, LatentDAE, create_dae, list_daes, sigma_schedule
