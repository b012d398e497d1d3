"""Model families; importing this package registers every model with timm."""
from ._builder import build_model, full_model, has_weights, list_models, load_model, names_weights, pretrained_cfg_for
from .adaln_vit import AdaLNViT, MergedViT
from .ddae_unet import DDAEUNet, UNet
from .dit import DDAE_DIT_PRESET, DiT, DiTEncoder, create_dit
from .extractor import FeatureExtractor, TimmFeatures, as_extractor
from .ldae_vit import LDAEEncoder, LatentDAE, create_dae
from .resnet_cifar import CifarResNet
from .wrappers import DiffusionInput
