"""Building blocks shared by the models of the zoo."""
from .blocks import AdaLNBlock, FinalLayer, adaln_modulation, init_adaln_weights, init_dit_weights, modulate
from .embed import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d, sinusoidal_embedding, timestep_frequency_embedding
from .pca import PatchPCA, PatchStats, float32_region, patchify, unpatchify
from .schedules import (
    SCHEDULES, DDPMSchedule, EDMSchedule, LinearSigmaSchedule, NoiseSchedule, SingleLevelSchedule, VPLinearSchedule,
    create_schedule, randn,
)
