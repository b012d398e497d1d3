"""l-DAE: latent Denoising Autoencoder encoders and the full denoising autoencoder.

Paper: "Deconstructing Denoising Diffusion Models for Self-Supervised Learning",
X. Chen, Z. Liu, S. Xie, K. He, https://arxiv.org/abs/2401.14404 (the final entry of Tab. 3, App. A).

The clean image is projected to a low-dimensional latent by patch-wise PCA, noise is added in that
latent, the noisy latent is projected back to pixels by inverse PCA, and a DiT-style ViT predicts the
original image; the loss weighs the residual in the full PCA basis (1 for the first d components, 0.1
for the rest) by ``lambda_t = 1 / (1 + sigma_t^2)``. The encoder is the first half of the blocks; its
feature is the mean of its output tokens. Choices the paper leaves open are documented in
``../shared/notes/ldae-spec.md`` and marked "(ours)" here.

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
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from timm.layers import resample_abs_pos_embed

from ..layers.blocks import AdaLNBlock, FinalLayer, init_adaln_weights
from ..layers.diffusion import randn_like
from ..layers.pca import PatchPCA, patchify
from ..pretrained import CheckpointMismatchError, load_pretrained, packaged_file, sha256_note, unwrap_state_dict
from .adaln_vit import AdaLNViT, TimestepT, create_adaln_encoder

__all__ = ['LDAEEncoder', 'LatentDAE', 'create_dae', 'list_daes', 'sigma_schedule', 'MODEL_CONFIGS', 'MODEL_ALIASES']

TARGETS = ('image', 'latent', 'noise')
NOISE_SPACES = ('latent', 'pixel')
NOISE_LEVELS = ('multi', 'single')
LOSS_WEIGHTS = ('auto', 'inv1p', 'none')
SIGMA_MAX = math.sqrt(2.0)
SINGLE_SIGMA = math.sqrt(1.0 / 3.0)


def sigma_schedule(t: torch.Tensor, num_timesteps: int = 1000, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """l-DAE's noise level: linear from 0 at t = 0 to ``sigma_max`` at t = T - 1, no input scaling."""
    return sigma_max * t.to(torch.float32) / (num_timesteps - 1)


class LDAEEncoder(AdaLNViT):
    """The l-DAE encoder: the first half of the DAE's blocks, conditioned on the timestep.

    It carries the DAE's PCA tokenizer (``self.tokenizer``) so that it can add l-DAE's latent noise to
    its own input (``add_noise``), as the paper's "noisy input" transfer setting does.
    """

    def __init__(
            self,
            *args: Any,
            latent_dim: int = 32,             # d, PCA components kept as the latent
            latent_scale: str = 'global',     # latent scale (ours): 'global' | 'whiten' | 'none'
            noise_space: str = 'latent',      # where noise is added: 'latent' (l-DAE) or 'pixel' (classical DAE)
            sigma_max: float = SIGMA_MAX,     # sigma at t = T - 1
            **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if noise_space not in NOISE_SPACES:
            raise ValueError(f'noise_space must be one of {NOISE_SPACES}, got {noise_space!r}')
        self.noise_space = noise_space
        self.sigma_max = sigma_max
        patch = self.patch_embed.patch_size[0]
        self.tokenizer = PatchPCA(patch, self.in_chans, latent_dim, latent_scale)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return sigma_schedule(t, self.num_timesteps, self.sigma_max)

    def add_noise(
            self,
            x: torch.Tensor,
            t: TimestepT = None,
            generator: Optional[torch.Generator] = None,
            noise: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Noise clean images at timestep(s) ``t`` the way this model was trained.

        Latent noise (l-DAE): ``x_t = unpatchify(V_d^T s (z~ + sigma_t eps) + mu)``, which also drops the
        D - d discarded PCA components; pixel noise: ``x_t = x + sigma_t eps``.

        Returns:
            (x_t (B, C, H, W), eps): eps is (B, N, d) for latent noise, (B, C, H, W) for pixel noise.
        """
        self.check_input(x)
        sigma = self.sigma(self.timesteps(t, x.shape[0], x.device)).expand(x.shape[0])
        return self.noise_at_sigma(x, sigma, generator=generator, noise=noise)

    def noise_at_sigma(
            self,
            x: torch.Tensor,
            sigma: torch.Tensor,
            generator: Optional[torch.Generator] = None,
            noise: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``add_noise`` with the noise level given directly as a (B,) sigma."""
        if self.noise_space == 'latent':
            return self.tokenizer.add_noise(x, sigma, noise=noise, generator=generator)
        if noise is None:
            noise = randn_like(x, generator)
        return x + sigma.to(x.dtype).reshape(-1, 1, 1, 1) * noise, noise


class LatentDAE(nn.Module):
    """The full l-DAE: PCA tokenizer, latent noise, DiT-style encoder + decoder, image prediction.

    ``dae(images)`` samples timesteps and noise and returns a dict with ``loss`` (scalar), ``pred``
    (the prediction as an image), ``noisy`` (the network input), ``t`` and ``sigma``. ``dae.encoder``
    is the conditional encoder and shares its weights with the DAE (it is a submodule).

    The ablation switches reproduce the paper's Tab. 2-3 rows:
    ``target``: 'image' (final l-DAE), 'latent' (clean latent, i.e. the loss only on the first d PCA
    components) or 'noise' (the latent noise eps); ``noise_space``: 'latent' or 'pixel' (classical DAE);
    ``noise_levels``: 'multi' (t uniform in 0..T-1) or 'single' (sigma = sqrt(1/3) for every sample);
    ``latent_dim``: d.
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
            noise_levels: str = 'multi',                   # 'multi' (schedule) | 'single' (one sigma)
            single_sigma: float = SINGLE_SIGMA,            # sigma of the single-level variant
            sigma_max: float = SIGMA_MAX,                  # sigma at t = T - 1
            residual_weight: float = 0.1,                  # w_i for PCA components i > d (image target)
            loss_weight: str = 'auto',                     # lambda_t: 'auto' (1/(1+sigma^2), 1 for noise), 'inv1p', 'none'
            num_timesteps: int = 1000,                     # T
            t: Optional[float] = None,                     # encoder's fixed transfer t (default 10; single level: its t)
            dynamic_img_size: bool = False,                # accept other input sizes
    ) -> None:
        super().__init__()
        for name, value, allowed in (('target', target, TARGETS), ('noise_space', noise_space, NOISE_SPACES),
                                     ('noise_levels', noise_levels, NOISE_LEVELS), ('loss_weight', loss_weight, LOSS_WEIGHTS)):
            if value not in allowed:
                raise ValueError(f'{name} must be one of {allowed}, got {value!r}')
        self.target = target
        self.noise_space = noise_space
        self.noise_levels = noise_levels
        self.single_sigma = single_sigma
        self.residual_weight = residual_weight
        self.loss_weight = loss_weight
        self.num_timesteps = num_timesteps
        self.patch_size = patch_size
        self.in_chans = in_chans
        if t is None:  # a single-level model is conditioned on the t whose sigma is single_sigma (ours)
            t = 10 if noise_levels == 'multi' else self._single_t(single_sigma, sigma_max, num_timesteps)
        self.encoder = LDAEEncoder(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, adaln_hidden_ratio=adaln_hidden_ratio, t=t,
            num_timesteps=num_timesteps, dynamic_img_size=dynamic_img_size, latent_dim=latent_dim,
            latent_scale=latent_scale, noise_space=noise_space, sigma_max=sigma_max)
        self.decoder_blocks = nn.ModuleList([
            AdaLNBlock(embed_dim, num_heads, mlp_ratio, adaln_hidden_ratio=adaln_hidden_ratio)
            for _ in range(depth if decoder_depth is None else decoder_depth)])
        self.final_layer = FinalLayer(embed_dim, patch_size * patch_size * in_chans)
        init_adaln_weights(self.decoder_blocks)
        init_adaln_weights(self.final_layer)

    @staticmethod
    def _single_t(sigma: float, sigma_max: float, num_timesteps: int) -> int:
        return int(round(sigma / sigma_max * (num_timesteps - 1)))

    @property
    def tokenizer(self) -> PatchPCA:
        return self.encoder.tokenizer

    @property
    def blocks(self) -> List[nn.Module]:
        """All blocks, encoder then decoder."""
        return list(self.encoder.blocks) + list(self.decoder_blocks)

    def fit_tokenizer(self, batches, patches_per_image: Optional[int] = None,
                      generator: Optional[torch.Generator] = None) -> PatchPCA:
        """Fit the PCA tokenizer on an iterable of image batches (streaming, float64)."""
        return self.tokenizer.fit(batches, patches_per_image=patches_per_image, generator=generator)

    # -- noise ---------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, device: torch.device,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """t uniform in {0..T-1} (multi-level) or the single level's t, shape (B,)."""
        if self.noise_levels == 'single':
            return torch.full((batch_size,), self.encoder.t, device=device)
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device).to(device)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.noise_levels == 'single':
            return torch.full(t.shape, self.single_sigma, device=t.device)
        return self.encoder.sigma(t)

    def add_noise(self, images: torch.Tensor, t: TimestepT, generator: Optional[torch.Generator] = None,
                  noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The network input at timestep(s) t, and the noise drawn (see ``LDAEEncoder.add_noise``)."""
        self.encoder.check_input(images)
        t = self.encoder.timesteps(t, images.shape[0], images.device).expand(images.shape[0])
        return self.encoder.noise_at_sigma(images, self.sigma(t), generator=generator, noise=noise)

    def noise_shape(self, images: torch.Tensor) -> Tuple[int, ...]:
        """Shape of one sample's noise: (N, d) in the latent, (C, H, W) in pixels."""
        if self.noise_space == 'pixel':
            return tuple(images.shape[1:])
        n = (images.shape[-2] // self.patch_size) * (images.shape[-1] // self.patch_size)
        return (n, self.tokenizer.latent_dim)

    # -- network -------------------------------------------------------------------------------------
    def denoise(self, noisy: torch.Tensor, t: TimestepT) -> torch.Tensor:
        """Run the network on a noisy input at timestep(s) t; returns the prediction as an image (B, C, H, W).

        With ``target='image'`` this is the denoised image; with 'latent' its first d PCA components are
        the predicted clean latent; with 'noise' it is the predicted noise projected to pixels.
        """
        B, _, H, W = noisy.shape
        x = self.encoder.embed(noisy)
        c = self.encoder.condition(t, B, x.device)
        for blk in self.blocks:
            x = self.encoder._run_block(blk, x, c)
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        grid = (H // self.patch_size, W // self.patch_size)
        return self.tokenizer.unpatchify(x, grid)

    def forward_intermediates(self, x: torch.Tensor, t: TimestepT = None,
                              indices: Optional[Union[int, List[int]]] = None,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False, **_: Any):
        """Block outputs over the whole DAE (encoder blocks 0..E-1, decoder blocks E..), as timm's."""
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        blocks = self.blocks
        take_indices, max_index = feature_take_indices(len(blocks), indices)
        B, _, H, W = x.shape
        x = self.encoder.embed(x)
        c = self.encoder.condition(t, B, x.device)
        out = []
        for i, blk in enumerate(blocks[:max_index + 1]):
            x = blk(x, c)
            if i in take_indices:
                out.append(x)
        if output_fmt == 'NCHW':
            gh, gw = H // self.patch_size, W // self.patch_size
            out = [y.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for y in out]
        return out if intermediates_only else (x, out)

    # -- loss ----------------------------------------------------------------------------------------
    def loss_weights(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda_t per sample."""
        if self.loss_weight == 'none' or (self.loss_weight == 'auto' and self.target == 'noise'):
            return torch.ones_like(sigma)
        return 1.0 / (1.0 + sigma.square())

    def component_weights(self, device: torch.device) -> torch.Tensor:
        """w_i: 1 for the first d PCA components, ``residual_weight`` for the rest (D,)."""
        w = torch.full((self.tokenizer.dim,), float(self.residual_weight), device=device)
        w[:self.tokenizer.latent_dim] = 1.0
        return w

    def compute_loss(self, pred: torch.Tensor, images: torch.Tensor, noise: torch.Tensor,
                     sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,), averaged over patches and normalised per dimension.

        image target: ``lambda_t * mean_i w_i r_i^2`` with ``r = V (x - x_hat)`` in the full basis
        (so with all w_i = 1 and lambda_t = 1 it is exactly the pixel MSE); latent target: mean squared
        error of the scaled latents; noise target: mean squared error of the noise.
        """
        tok = self.tokenizer
        if self.target == 'image':
            r = tok.coefficients(patchify(images - pred, self.patch_size), center=False)  # (B, N, D)
            per_patch = (r.square() * self.component_weights(r.device)).mean(-1)
        elif self.target == 'latent':
            per_patch = (tok.encode(images) - tok.encode(pred)).square().mean(-1)
        elif self.noise_space == 'latent':  # noise target, latent noise: compare in the scaled latent
            eps_hat = patchify(pred, self.patch_size) @ tok.components[:tok.latent_dim].T / tok.scale()
            per_patch = (noise - eps_hat).square().mean(-1)
        else:  # noise target, pixel noise
            per_patch = patchify((noise - pred).square(), self.patch_size).mean(-1)
        return per_patch.mean(1) * self.loss_weights(sigma)

    def forward(self, images: torch.Tensor, t: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None,
                noise: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """One training step's forward: sample t and noise (unless given), denoise, and compute the loss.

        ``noise`` has the shape ``noise_shape`` gives: (B, N, d) for latent noise, (B, C, H, W) for pixel noise.
        """
        self.encoder.check_input(images)
        B = images.shape[0]
        if t is None:
            t = self.sample_timesteps(B, images.device, generator)
        t = self.encoder.timesteps(t, B, images.device).expand(B)
        sigma = self.sigma(t)
        noisy, noise = self.encoder.noise_at_sigma(images, sigma, generator=generator, noise=noise)
        pred = self.denoise(noisy, t)
        per_sample = self.compute_loss(pred, images, noise, sigma)
        return dict(loss=per_sample.mean(), loss_per_sample=per_sample, pred=pred, noisy=noisy, t=t, sigma=sigma)


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


def _resolve_name(name: str) -> str:
    base = name.split('.', 1)[0]
    base = MODEL_ALIASES.get(base, base)
    if base not in MODEL_CONFIGS:
        known = sorted(MODEL_CONFIGS) + sorted(MODEL_ALIASES)
        raise ValueError(f'unknown l-DAE model {name!r}; known: {", ".join(known)}')
    return base


def list_daes() -> List[str]:
    """Names accepted by ``create_dae`` (aliases included)."""
    return sorted(MODEL_CONFIGS) + sorted(MODEL_ALIASES)


def create_dae(name: str, pretrained: bool = False, checkpoint: Optional[str] = None,
               cache_dir: Optional[str] = None, **kwargs: Any) -> LatentDAE:
    """Build the full l-DAE (encoder, decoder, PCA tokenizer) of a registered size; ``kwargs`` override its config.

    ``pretrained=True`` loads the full-DAE weights of the tag in ``name`` (e.g. ``'ldae_vit_tiny_patch4_32.cifar10'``,
    or the architecture's default tag), through the same safe, sha256-checked path as ``timm.create_model``.
    ``checkpoint`` loads a full-DAE file instead (``model.safetensors`` of ``ldae-models train``, or a training
    checkpoint), strictly. Example: ``create_dae('ldae_vit_tiny_patch4_32', latent_dim=8)``.
    """
    dae = LatentDAE(**{**MODEL_CONFIGS[_resolve_name(name)], **kwargs})
    full = lambda sd, model: unwrap_state_dict(sd)  # noqa: E731 -- the file holds the whole DAE
    if checkpoint:
        load_pretrained(dae, dict(file=checkpoint), filter_fn=full)
    elif pretrained:
        from timm.models import get_pretrained_cfg
        base, _, tag = name.partition('.')
        base = MODEL_ALIASES.get(base, base)
        try:
            cfg = get_pretrained_cfg(f'{base}.{tag}' if tag else base)
        except RuntimeError:  # timm: an invalid tag for a known architecture
            cfg = None
        if cfg is None:
            import timm
            raise ValueError(f'unknown pretrained tag {name!r}; tags: {", ".join(timm.list_pretrained(base + "*"))}')
        cfg = cfg.to_dict()
        try:
            load_pretrained(dae, cfg, filter_fn=full, cache_dir=cache_dir)
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f'{name}: its weights do not hold the full DAE this size builds (an '
                                          f'encoder-only file, or other model arguments)\n{e}') from None
        dae.pretrained_cfg = cfg
    return dae


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert a checkpoint into the state dict of an ``LDAEEncoder``.

    Accepts encoder checkpoints and full-DAE checkpoints (keys ``encoder.*``; the decoder is dropped),
    wrapped or not (``model``/``ema``/``state_dict``, ``module.``, ``_orig_mod.``), and resamples the
    position embedding when the checkpoint's grid differs from the model's.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith('encoder.') for k in state_dict):
        state_dict = {k[len('encoder.'):]: v for k, v in state_dict.items() if k.startswith('encoder.')}
    pos = state_dict.get('pos_embed')
    own = getattr(model, 'pos_embed', None)
    if pos is not None and own is not None and pos.shape != own.shape and pos.dim() == 3 \
            and pos.shape[-1] == own.shape[-1] and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        # a square grid of the same width: resample (anything else is left for the strict load to report)
        state_dict['pos_embed'] = resample_abs_pos_embed(
            pos, new_size=model.patch_embed.grid_size, num_prefix_tokens=0)
    return state_dict


def _create_ldae_encoder(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    return create_adaln_encoder(LDAEEncoder, variant, pretrained, checkpoint_filter_fn, MODEL_CONFIGS[variant], kwargs)[0]


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
        description='l-DAE ViT-Ti/4 trained by ldae-models on the CIFAR-10 train split (model card: '
                    'ldae_models/weights/ldae_vit_tiny_patch4_32.cifar10.md); the file holds the whole DAE '
                    '(encoder, decoder, PCA tokenizer) in float16, the PCA statistics and positions in float32',
        notes=(sha256_note(TINY_CIFAR10_SHA256),)),
    'ldae_vit_small_patch4_32': _cfg(input_size=(3, 32, 32)),
    'ldae_vit_base_patch16_256': _cfg(),
    'ldae_vit_halflarge_patch16_256': _cfg(),
    'ldae_vit_large_patch16_256': _cfg(),
})


@register_model
def ldae_vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """l-DAE ViT-Ti/4 encoder for 32x32 images (12 of 24 blocks, width 192)."""
    return _create_ldae_encoder('ldae_vit_tiny_patch4_32', pretrained=pretrained, **kwargs)


@register_model
def ldae_vit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """l-DAE ViT-S/4 encoder for 32x32 images (12 of 24 blocks, width 384)."""
    return _create_ldae_encoder('ldae_vit_small_patch4_32', pretrained=pretrained, **kwargs)


@register_model
def ldae_vit_base_patch16_256(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """l-DAE ViT-B/16 encoder at 256 px (12 of 24 blocks, width 768)."""
    return _create_ldae_encoder('ldae_vit_base_patch16_256', pretrained=pretrained, **kwargs)


@register_model
def ldae_vit_halflarge_patch16_256(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """l-DAE ViT-1/2L/16 encoder at 256 px (12 of 24 blocks of DiT-L, width 1024)."""
    return _create_ldae_encoder('ldae_vit_halflarge_patch16_256', pretrained=pretrained, **kwargs)


@register_model
def ldae_vit_large_patch16_256(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """l-DAE ViT-L/16 encoder at 256 px (24 of 48 blocks, width 1024)."""
    return _create_ldae_encoder('ldae_vit_large_patch16_256', pretrained=pretrained, **kwargs)


@register_model
def ldae_vit_b(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Alias of ``ldae_vit_base_patch16_256``."""
    return _create_ldae_encoder('ldae_vit_base_patch16_256', pretrained=pretrained, **kwargs)


@register_model
def ldae_vit_half_l(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Alias of ``ldae_vit_halflarge_patch16_256``."""
    return _create_ldae_encoder('ldae_vit_halflarge_patch16_256', pretrained=pretrained, **kwargs)


@register_model
def ldae_vit_l(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Alias of ``ldae_vit_large_patch16_256``."""
    return _create_ldae_encoder('ldae_vit_large_patch16_256', pretrained=pretrained, **kwargs)
