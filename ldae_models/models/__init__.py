"""Model families; importing this package registers every model with timm."""
from .adaln_vit import AdaLNViT
from .ddae_unet import DDAEUNet, UNet
from .dit import DDAE_DIT_PRESET, DiT, DiTEncoder, create_dit, list_dits
from .ldae_vit import LDAEEncoder, LatentDAE, create_dae, list_daes, sigma_schedule
from .wrappers import DiffusionInput
