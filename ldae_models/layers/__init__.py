"""Building blocks shared by the DiT-style models of the zoo."""
from .blocks import AdaLNBlock, FinalLayer, adaln_modulation, init_adaln_weights, modulate
from .diffusion import alphas_cumprod, linear_betas, q_sample
from .embed import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d, timestep_frequency_embedding
from .pca import PatchPCA, PatchStats, patchify, unpatchify
