"""l-DAE: latent Denoising Autoencoder encoders and the full denoising autoencoder.

Paper: "Deconstructing Denoising Diffusion Models for Self-Supervised Learning",
X. Chen, Z. Liu, S. Xie, K. He, https://arxiv.org/abs/2401.14404 (the final entry of Tab. 3, App. A).

The clean image is projected to a low-dimensional latent by patch-wise PCA, noise is added in that
latent, the noisy latent is projected back to pixels by inverse PCA, and a DiT-style ViT predicts the
original image; the loss weighs the residual in the full PCA basis (1 for the first d components, 0.1
for the rest) by ``lambda_t = 1 / (1 + sigma_t^2)``. The encoder is the first half of the blocks; its
feature is the mean of its output tokens. Choices the paper leaves open are marked "(ours)" here and listed in the
README ("How l-DAE is implemented").

Registered timm encoders (``num_classes=0``: ``model(x)`` gives pooled features; merged at ``t=10`` by
default, ``merged=False`` gives the conditional encoder):

==================================  ======  =====  =====  =====  =========
name (alias)                        input   patch  width  depth  latent d
==================================  ======  =====  =====  =====  =========
ldae_vit_tiny_patch4_32             32      4      192    12     12
ldae_vit_small_patch4_32            32      4      384    12     12
ldae_vit_base_patch16_256 (b)       256     16     768    12     32
ldae_vit_halflarge_patch16_256      256     16     1024   12     32
ldae_vit_large_patch16_256 (l)      256     16     1024   24     32
==================================  ======  =====  =====  =====  =========

The decoder has as many blocks as the encoder (the paper's symmetric split).
"""
import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models import generate_default_cfgs
from timm.models._features import feature_take_indices

from ..hub.loading import CheckpointMismatchError, load_pretrained
from ..hub.sources import packaged_file, sha256_note, strip_weights_info
from ..layers.blocks import AdaLNBlock, FinalLayer, init_adaln_weights
from ..layers.pca import PatchPCA, float32_region, patchify
from ..layers.schedules import NoiseSchedule, TARGETS, TimestepLike, create_schedule
from ._builder import build_model, pretrained_cfg_for, register_family, split_name
from .adaln_vit import AdaLNViT, _tokens_to_maps
from .extractor import FeatureExtractor

__all__ = ['LDAEEncoder', 'LatentDAE', 'create_dae', 'MODEL_CONFIGS', 'MODEL_ALIASES']

NOISE_SPACES = ('latent', 'pixel')
LOSS_WEIGHTS = ('auto', 'none')


def _check_choice(name: str, value: Any, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


class LDAEEncoder(AdaLNViT):
    """The l-DAE encoder: the first half of the DAE's blocks, conditioned on the timestep.

    It carries the DAE's PCA tokenizer (``self.tokenizer``) so that it can add l-DAE's latent noise to its own input
    (``noise_input``), as the paper's "noisy input" transfer setting does.
    """

    def __init__(
            self,
            *args: Any,
            latent_dim: int = 32,             # d, PCA components kept as the latent
            latent_scale: str = 'global',     # latent scale (ours): 'global' | 'whiten' | 'none'
            noise_space: str = 'latent',      # where noise is added: 'latent' (l-DAE) or 'pixel' (classical DAE)
            **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        _check_choice('noise_space', noise_space, NOISE_SPACES)
        self.noise_space = noise_space
        self.tokenizer = PatchPCA(self.patch_embed.patch_size[0], self.in_chans, latent_dim, latent_scale)

    @property
    def noise_is_schedule_only(self) -> bool:
        return self.noise_space == 'pixel'

    def noise_input(self, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Noise clean images at a checked (B,) t the way this model was trained.

        Latent noise (l-DAE): ``x_t = unpatchify(V_d^T s z_t + mu)`` with ``z_t = alpha_t z + sigma_t eps`` in the
        scaled latent (this also drops the D - d discarded PCA components); pixel noise: the schedule on the image.

        Returns:
            (x_t (B, C, H, W), eps): eps is (B, N, d) for latent noise, (B, C, H, W) for pixel noise.
        """
        if self.noise_space == 'pixel':
            return self.schedule.add_noise(x, t, noise=noise, generator=generator)
        z = self.tokenizer.encode(x)
        with float32_region(z):
            z_t, noise = self.schedule.add_noise(z, t, noise=noise, generator=generator)
        return self.tokenizer.decode(z_t, self.grid_size(x)), noise


class LatentDAE(FeatureExtractor, nn.Module):
    """The full l-DAE: PCA tokenizer, latent noise, DiT-style encoder + decoder, image prediction.

    ``dae(images)`` samples timesteps and noise and returns a dict with ``loss`` (scalar), ``pred`` (the prediction
    as an image), ``noisy`` (the network input), ``t`` and ``noise``. ``dae.encoder`` is the conditional encoder and
    shares its weights and its schedule with the DAE (it is a submodule).

    The ablation switches reproduce the paper's Tab. 1-3 rows: ``target``: 'image' (final l-DAE), 'latent' (the
    clean latent, i.e. the loss only on the first d PCA components) or 'noise' (the latent noise eps);
    ``noise_space``: 'latent' or 'pixel' (classical DAE); ``schedule``: 'linear_sigma' (final), 'single' (one noise
    level), 'vp_linear' (input-scaled, variance preserving: Tab. 1 last row, Tab. 3 rows 1-2); ``latent_dim``: d.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 256,   # input resolution
            patch_size: int = 16,                          # p
            in_chans: int = 3,                             # image channels
            embed_dim: int = 768,                          # token width W
            depth: int = 12,                               # encoder blocks
            decoder_depth: Optional[int] = None,           # decoder blocks (default: depth, the symmetric split)
            num_heads: int = 12,                           # attention heads
            mlp_ratio: float = 4.0,                        # MLP hidden = mlp_ratio * W
            adaln_hidden_ratio: Optional[float] = 0.25,    # modulation MLP hidden / W (None: DiT's one Linear)
            latent_dim: int = 32,                          # d, kept PCA components
            latent_scale: str = 'global',                  # latent scale (ours): 'global' | 'whiten' | 'none'
            target: str = 'image',                         # prediction target: 'image' | 'latent' | 'noise'
            noise_space: str = 'latent',                   # 'latent' (l-DAE) | 'pixel' (classical DAE)
            schedule: Union[str, NoiseSchedule] = 'linear_sigma',  # 'linear_sigma' | 'single' | 'vp_linear' | ...
            schedule_args: Optional[Dict[str, Any]] = None,        # e.g. {'sigma_max': 2.0}
            residual_weight: float = 0.1,                  # w_i for PCA components i > d (image target)
            loss_weight: str = 'auto',                     # lambda_t: 'auto' (the schedule's) | 'none' (1)
            t: Optional[float] = None,                     # the encoder's transfer t (default 10; 'single': its t)
            dynamic_img_size: bool = False,                # accept other input sizes
    ) -> None:
        super().__init__()
        _check_choice('target', target, TARGETS)
        _check_choice('loss_weight', loss_weight, LOSS_WEIGHTS)
        self.target = target
        self.noise_space = noise_space
        self.residual_weight = residual_weight
        self.loss_weight = loss_weight
        self.patch_size = patch_size
        self.in_chans = in_chans
        sched = create_schedule(schedule, **(schedule_args or {}))
        # what rebuilds the encoder alone (timm.create_model(name, **encoder_args)), as plain data
        self.encoder_args: Dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, adaln_hidden_ratio=adaln_hidden_ratio, t=t,
            schedule=sched.name, schedule_args=sched.config(), dynamic_img_size=dynamic_img_size,
            latent_dim=latent_dim, latent_scale=latent_scale, noise_space=noise_space)
        self.encoder = LDAEEncoder(**{**self.encoder_args, 'schedule': sched, 'schedule_args': None})
        self.encoder_args['t'] = self.encoder.t
        self.decoder_blocks = nn.ModuleList([
            AdaLNBlock(embed_dim, num_heads, mlp_ratio, adaln_hidden_ratio=adaln_hidden_ratio)
            for _ in range(depth if decoder_depth is None else decoder_depth)])
        self.final_layer = FinalLayer(embed_dim, patch_size * patch_size * in_chans)
        init_adaln_weights(self.decoder_blocks)
        init_adaln_weights(self.final_layer)

    @property
    def schedule(self) -> NoiseSchedule:
        return self.encoder.schedule

    @property
    def t(self) -> float:
        return self.encoder.t

    @property
    def tokenizer(self) -> PatchPCA:
        return self.encoder.tokenizer

    @property
    def blocks(self) -> List[nn.Module]:
        """All blocks, encoder then decoder."""
        return list(self.encoder.blocks) + list(self.decoder_blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (all blocks run through the encoder's runner)."""
        self.encoder.set_grad_checkpointing(enable)

    def fit_tokenizer(self, batches, patches_per_image: Optional[int] = None,
                      generator: Optional[torch.Generator] = None) -> PatchPCA:
        """Fit the PCA tokenizer on an iterable of image batches (streaming, float64)."""
        return self.tokenizer.fit(batches, patches_per_image=patches_per_image, generator=generator)

    # -- the encoder contract: blocks numbered encoder first, then decoder ---------------------------------------
    @property
    def num_taps(self) -> int:
        return len(self.encoder.blocks) + len(self.decoder_blocks)

    def encode_input(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_input(images)

    def noise_input(self, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.noise_input(x, t, noise=noise, generator=generator)

    def tap(self, x: torch.Tensor, t: Optional[torch.Tensor], indices: List[int]) -> List[torch.Tensor]:
        tokens = self.encoder._run(x, t, take=indices, blocks=self.blocks, stop=max(indices) + 1)[1]
        return _tokens_to_maps(tokens, self.encoder.grid_size(x))

    def forward_intermediates(self, x: torch.Tensor, t: TimestepLike = None,
                              indices: Optional[Union[int, List[int]]] = None, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False, **_: Any):
        """Block outputs over the whole DAE (encoder blocks 0..E-1, decoder blocks E..), as timm's."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(self.num_taps, indices)
        x = self.encode_input(x)
        t = self.schedule.timesteps(self.t if t is None else t, x.shape[0], x.device)
        last, out = self.encoder._run(x, t, take=take, blocks=self.blocks, stop=max_index + 1)
        if output_fmt == 'NCHW':
            out = _tokens_to_maps(out, self.encoder.grid_size(x))
        return out if intermediates_only else (last, out)

    # -- noise ---------------------------------------------------------------------------------------
    def noise_shape(self, images: torch.Tensor) -> Tuple[int, ...]:
        """Shape of one sample's noise: (N, d) in the latent, (C, H, W) in pixels."""
        if self.noise_space == 'pixel':
            return tuple(images.shape[1:])
        n = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        return (n, self.tokenizer.latent_dim)

    # -- network -------------------------------------------------------------------------------------
    def denoise(self, noisy: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """Run the network on a noisy input at timestep(s) t; returns the prediction as an image (B, C, H, W).

        With ``target='image'`` this is the denoised image; with 'latent' its first d PCA components are the predicted
        clean latent; with 'noise' it is the predicted noise projected to pixels.
        """
        noisy = self.encode_input(noisy)
        return self._denoise(noisy, self.schedule.timesteps(t, noisy.shape[0], noisy.device))

    def _denoise(self, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.embed(noisy)
        c = enc.condition(t)
        for blk in self.blocks:
            x = enc.run_block(blk, x, c)
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        return self.tokenizer.unpatchify(x, enc.grid_size(noisy))

    # -- loss ----------------------------------------------------------------------------------------
    def component_weights(self, device: torch.device) -> torch.Tensor:
        """w_i: 1 for the first d PCA components, ``residual_weight`` for the rest (D,)."""
        w = torch.full((self.tokenizer.dim,), float(self.residual_weight), device=device)
        return w.index_fill_(0, torch.arange(self.tokenizer.latent_dim, device=device), 1.0)  # no host tensor

    def compute_loss(self, pred: torch.Tensor, images: torch.Tensor, noise: Optional[torch.Tensor],
                     t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,), averaged over patches and normalised per dimension, in float32 (also under autocast).

        image target: ``lambda_t * mean_i w_i r_i^2`` with ``r = V (x - x_hat)`` in the full basis (so with all w_i = 1
        and lambda_t = 1 it is exactly the pixel MSE); latent target: mean squared error of the scaled latents; noise
        target: mean squared error of the noise.
        """
        tok = self.tokenizer
        with float32_region(pred):
            pred, images = pred.float(), images.float()
            if self.target == 'image':
                r = tok.coefficients(patchify(images - pred, self.patch_size), center=False)  # (B, N, D)
                per_patch = (r.square() * self.component_weights(r.device)).mean(-1)
            elif self.target == 'latent':
                per_patch = (tok.encode(images) - tok.encode(pred)).square().mean(-1)
            elif self.noise_space == 'latent':  # noise target, latent noise: compare in the scaled latent
                eps_hat = patchify(pred, self.patch_size) @ tok.components[:tok.latent_dim].T / tok.scale()
                per_patch = (noise.float() - eps_hat).square().mean(-1)
            else:  # noise target, pixel noise
                per_patch = patchify((noise.float() - pred).square(), self.patch_size).mean(-1)
            weight = self.schedule.loss_weight(t, self.target) if self.loss_weight == 'auto' else torch.ones_like(t)
            return per_patch.mean(1) * weight

    def _step(self, images: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor],
              generator: Optional[torch.Generator]) -> Dict[str, torch.Tensor]:
        noisy, noise = self.noise_input(images, t, noise=noise, generator=generator)
        pred = self._denoise(noisy, t)
        per_sample = self.compute_loss(pred, images, noise, t)
        return dict(loss=per_sample.mean(), loss_per_sample=per_sample, pred=pred, noisy=noisy, t=t, noise=noise)

    def training_loss(self, images: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The scalar loss for a batch, t drawn by ``schedule.sample_t`` and noise of ``noise_shape``: the training
        loop's call, with no checks that would wait on the device."""
        return self._step(images, t, noise, None)['loss']

    def forward(self, images: torch.Tensor, t: TimestepLike = None, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """One training step's forward: sample t and noise (unless given; a given t is checked), denoise, the loss.

        ``noise`` has the shape ``noise_shape`` gives: (B, N, d) for latent noise, (B, C, H, W) for pixel noise.
        """
        images = self.encode_input(images)
        B = images.shape[0]
        if t is None:
            t = self.schedule.sample_t(B, generator=generator, device=images.device)
        else:
            t = self.schedule.timesteps(t, B, images.device)
        return self._step(images, t, noise, generator)


# ------------------------------------------------------------------------------------------------------
# Configurations, checkpoint filter, timm registration
# ------------------------------------------------------------------------------------------------------

MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    # Small-image variants (ours): CIFAR-size input, patch 4 (D = 48), ViT-Ti / ViT-S encoder and decoder.
    'ldae_vit_tiny_patch4_32': dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, latent_dim=12),
    'ldae_vit_small_patch4_32': dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6, latent_dim=12),
    # The paper's sizes (Sec. 5, Tab. 4): d = 32 of D = 768.
    'ldae_vit_base_patch16_256': dict(img_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12, latent_dim=32),
    'ldae_vit_halflarge_patch16_256': dict(img_size=256, patch_size=16, embed_dim=1024, depth=12, num_heads=16, latent_dim=32),
    'ldae_vit_large_patch16_256': dict(img_size=256, patch_size=16, embed_dim=1024, depth=24, num_heads=16, latent_dim=32),
}
MODEL_ALIASES: Dict[str, str] = {
    'ldae_vit_b': 'ldae_vit_base_patch16_256',
    'ldae_vit_half_l': 'ldae_vit_halflarge_patch16_256',
    'ldae_vit_l': 'ldae_vit_large_patch16_256',
}


def _variant(name: str) -> str:
    arch = split_name(name)[0]
    arch = MODEL_ALIASES.get(arch, arch)
    if arch not in MODEL_CONFIGS:
        raise ValueError(f'unknown l-DAE model {name!r}; known: {", ".join(_list_daes())}')
    return arch


def _list_daes() -> List[str]:
    """Names accepted by ``create_dae`` (aliases included)."""
    return sorted(MODEL_CONFIGS) + sorted(MODEL_ALIASES)


def create_dae(name: str, pretrained: bool = False, checkpoint: Optional[str] = None,
               cache_dir: Optional[str] = None, **kwargs: Any) -> LatentDAE:
    """Build the full l-DAE (encoder, decoder, PCA tokenizer) of a registered size; ``kwargs`` override its config.

    ``pretrained=True`` loads the full-DAE weights of the tag in ``name`` (e.g. ``'ldae_vit_tiny_patch4_32.cifar10'``,
    or the architecture's default tag), through the same safe, sha256-checked path as ``timm.create_model``.
    ``checkpoint`` loads a full-DAE file instead (``model.safetensors`` of ``ldae-models train``, or a training
    checkpoint, its EMA weights when it has them), strictly. Example: ``create_dae('ldae_vit_tiny_patch4_32',
    latent_dim=8)``.
    """
    variant = _variant(name)
    dae = LatentDAE(**{**MODEL_CONFIGS[variant], **kwargs})
    tagged = pretrained and not checkpoint
    cfg = pretrained_cfg_for(name) if tagged else strip_weights_info(pretrained_cfg_for(variant))
    if checkpoint or pretrained:
        try:
            load_pretrained(dae, dict(file=str(checkpoint)) if checkpoint else cfg, cache_dir=cache_dir)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f'{checkpoint or name}: the file does not hold the full DAE this size builds '
                                          f'(an encoder-only file, or other model arguments)\n{e}') from None
    dae.pretrained_cfg = {**cfg, 'input_size': dae.encoder.input_size()}
    return dae


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """An unwrapped encoder or full-DAE state dict -> the state dict of an ``LDAEEncoder``.

    Full-DAE files keep their ``encoder.*`` keys (the decoder is dropped); the position embedding is resampled when
    the checkpoint's grid differs from the model's.
    """
    if any(k.startswith('encoder.') for k in state_dict):
        state_dict = {k[len('encoder.'):]: v for k, v in state_dict.items() if k.startswith('encoder.')}
    pos = state_dict.get('pos_embed')
    own = getattr(model, 'pos_embed', None)
    if pos is not None and own is not None and pos.shape != own.shape and pos.dim() == 3 \
            and pos.shape[-1] == own.shape[-1] and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        # a square grid of the same width: resample (anything else is left for the strict load to report)
        state_dict['pos_embed'] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size, num_prefix_tokens=0)
    conv = state_dict.get('patch_embed.proj.weight')
    tok = getattr(model, 'tokenizer', None)
    if conv is not None and tok is not None and conv.dim() == 4 and conv.shape[1] != model.in_chans:
        # another in_chans (the first convolution is adapted by the loader): the PCA basis of the checkpoint's patches
        # does not apply to these, so the tokenizer stays unfitted (no latent noise; clean features are unaffected)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('tokenizer.')}
        state_dict.update({f'tokenizer.{k}': v for k, v in tok.state_dict().items()})
    return state_dict


def _create_ldae_encoder(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return build_model(LDAEEncoder, variant, pretrained, {**MODEL_CONFIGS[variant], **kwargs},
                       filter_fn=checkpoint_filter_fn)


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 0, 'input_size': (3, 256, 256), 'pool_size': None,
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),  # images in [-1, 1]
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2401.14404', 'paper_name': 'Deconstructing Denoising Diffusion Models for Self-Supervised Learning',
        **kwargs,
    }


# The zoo's own checkpoints. A tag is listed only when its bytes exist; the first tag of an architecture is its
# default (``timm.create_model('ldae_vit_tiny_patch4_32', pretrained=True)``).
TINY_CIFAR10_FILE = 'ldae_vit_tiny_patch4_32.cifar10.safetensors'
TINY_CIFAR10_SHA256 = 'c2eb2efd957a1f68cec7b03b46c32690c6edae01a8e3f3bc56934a57c9435552'

default_cfgs = generate_default_cfgs({
    'ldae_vit_tiny_patch4_32.cifar10': _cfg(
        file=packaged_file(TINY_CIFAR10_FILE), input_size=(3, 32, 32), license='apache-2.0',
        description='l-DAE ViT-Ti/4 trained by ldae-models on the CIFAR-10 train split for 4 epochs on a CPU (model '
                    'card: ldae_models/weights/ldae_vit_tiny_patch4_32.cifar10.md); the file holds the whole DAE '
                    '(encoder, decoder, PCA tokenizer) in float16, the PCA statistics and positions in float32',
        notes=(sha256_note(TINY_CIFAR10_SHA256),)),
    'ldae_vit_small_patch4_32': _cfg(input_size=(3, 32, 32)),
    'ldae_vit_base_patch16_256': _cfg(),
    'ldae_vit_halflarge_patch16_256': _cfg(),
    'ldae_vit_large_patch16_256': _cfg(),
})

register_family('ldae', __name__, {**{n: n for n in MODEL_CONFIGS}, **MODEL_ALIASES}, _create_ldae_encoder,
                full_model=create_dae, docs={
    'ldae_vit_tiny_patch4_32': 'l-DAE ViT-Ti/4 encoder for 32x32 images (12 of 24 blocks, width 192).',
    'ldae_vit_small_patch4_32': 'l-DAE ViT-S/4 encoder for 32x32 images (12 of 24 blocks, width 384).',
    'ldae_vit_base_patch16_256': 'l-DAE ViT-B/16 encoder at 256 px (12 of 24 blocks, width 768).',
    'ldae_vit_halflarge_patch16_256': 'l-DAE ViT-1/2L/16 encoder at 256 px (12 of 24 blocks of DiT-L, width 1024).',
    'ldae_vit_large_patch16_256': 'l-DAE ViT-L/16 encoder at 256 px (24 of 48 blocks, width 1024).',
    'ldae_vit_b': 'Alias of ldae_vit_base_patch16_256.',
    'ldae_vit_half_l': 'Alias of ldae_vit_halflarge_patch16_256.',
    'ldae_vit_l': 'Alias of ldae_vit_large_patch16_256.',
})
