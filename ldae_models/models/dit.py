"""DiT: Diffusion Transformers as full models and as (merged) feature encoders.

Paper: "Scalable Diffusion Models with Transformers", W. Peebles, S. Xie, https://arxiv.org/abs/2212.09748.
Feature extraction as in DDAE ("Denoising Diffusion Autoencoders are Unified Self-supervised Learners",
https://arxiv.org/abs/2303.09769): tap a block's tokens at a fixed timestep with the null label.

``DiT`` computes exactly what the official ``models.py`` computes and uses its parameter names, so the
released checkpoints (plain state dicts) load as they are. It is built from the same layers as l-DAE
(``ldae_models.layers``): adaLN-Zero blocks with DiT's one-Linear modulation, the 256-d cos-first timestep
embedding, the label embedding whose row 1000 is the null class, the final layer, fixed sin-cos positions.

Registered encoders ``dit_{s,b,l,xl}_patch{2,4,8}_{256,512}`` (timm names) run on SD-VAE latents
(32x32x4 for 256 px images, 64x64x4 for 512 px) and default to the first half of the blocks, t = 121 and the
null label, merged into a plain timm ViT on latents (``merged=False``: the conditional encoder). Options:
``depth=`` (number of blocks: block k, 0-based, is ``depth=k + 1``), ``t=``, ``y=``, ``noisy_input=True`` (add DiT's
forward-process noise at t to the latent, as DDAE does), ``vae=`` (a diffusers ``AutoencoderKL`` or its hub
name, so the model takes images in [-1, 1]).

``DDAE_DIT_PRESET`` is DDAE's CIFAR-10 setting for DiT-XL/2-256: block 13 of 28 (``depth=14``), t = 121, null
label, noisy input:
``timm.create_model('dit_xl_patch2_256.fb_in1k', pretrained=True, **ldae_models.DDAE_DIT_PRESET)``.

Two layouts of checkpoints are converted by ``checkpoint_filter_fn``: the official one and diffusers'
``DiTTransformer2DModel`` (``dit_official_to_diffusers`` / ``dit_diffusers_to_official``). diffusers computes
DiT slightly differently in two places; a converted model here always computes the official DiT:

1. its ``Timesteps(downscale_freq_shift=1)`` uses frequencies ``exp(-ln(10000) i / 127)`` where DiT divides by
   128 (``half``);
2. its feed-forward LayerNorm (``norm3``) has eps 1e-5 where DiT's ``norm2`` has 1e-6.

``tests/test_dit.py`` measures both effects and checks that with them undone diffusers matches to 1e-5.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import generate_default_cfgs

from ..layers.blocks import AdaLNBlock, FinalLayer, init_dit_weights
from ..layers.embed import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d
from ..layers.pca import unpatchify
from ..layers.schedules import DDPMSchedule
from ..hub.loading import load_pretrained
from ._builder import build_model, pretrained_cfg_for, register_family, split_name
from .adaln_vit import AdaLNViT
from .wrappers import DiffusionInput

__all__ = ['DiT', 'DiTEncoder', 'create_dit', 'dit_official_to_diffusers', 'dit_diffusers_to_official',
           'DIT_CONFIGS', 'DDAE_DIT_PRESET', 'SD_VAE_SCALE']

SD_VAE_SCALE = 0.18215  # latents = vae.encode(x).latent_dist * 0.18215 (LDM / DiT)
DDAE_DIT_PRESET: Dict[str, Any] = dict(depth=14, t=121, y=1000, noisy_input=True)

# (width, depth, heads) of DiT-S/B/L/XL (the paper's Tab. 1); every (size, patch, resolution) is registered.
_SIZES = {'s': (384, 12, 6), 'b': (768, 12, 12), 'l': (1024, 24, 16), 'xl': (1152, 28, 16)}
DIT_CONFIGS: Dict[str, Dict[str, Any]] = {
    f'dit_{size}_patch{p}_{res}': dict(input_size=res // 8, patch_size=p, hidden_size=w, depth=d, num_heads=h)
    for size, (w, d, h) in _SIZES.items() for p in (2, 4, 8) for res in (256, 512)
}


class DiT(nn.Module):
    """The full Diffusion Transformer, parameter for parameter the official implementation.

    ``dit(x, t, y)``: latents (B, C, H, W), timesteps (B,) in [0, 1000), labels (B,) in [0, 1000] (1000 = null)
    -> (B, 2C, H, W): the predicted noise and the variance interpolation (``learn_sigma=True``).
    """

    def __init__(
            self,
            input_size: int = 32,            # latent side (256 px / 8)
            patch_size: int = 2,             # latent pixels per patch side
            in_channels: int = 4,            # latent channels of the SD VAE
            hidden_size: int = 1152,         # token width
            depth: int = 28,                 # transformer blocks
            num_heads: int = 16,             # attention heads
            mlp_ratio: float = 4.0,          # MLP hidden = mlp_ratio * width
            class_dropout_prob: float = 0.1,  # label dropout in training (> 0 adds the null-label row)
            num_classes: int = 1000,         # ImageNet classes
            learn_sigma: bool = True,        # also output the variance interpolation
            num_timesteps: int = 1000,       # DDPM steps: valid t are [0, num_timesteps)
    ) -> None:
        super().__init__()
        self.schedule = DDPMSchedule(num_timesteps)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = self.x_embedder.grid_size
        self.register_buffer('pos_embed', sincos_pos_embed_2d(hidden_size, grid)[None])  # (1, N, D), fixed
        self.blocks = nn.ModuleList([AdaLNBlock(hidden_size, num_heads, mlp_ratio, adaln_hidden_ratio=None)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's: xavier Linears, xavier patch embed, N(0, 0.02) label and timestep tables, zero adaLN and output."""
        init_dit_weights(self, self.x_embedder.proj, self.t_embedder, self.y_embedder.embedding_table)

    def forward_hidden(self, x: torch.Tensor, t: Any, y: Any) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(output (B, out_channels, H, W), hidden states after every block [(B, N, D)])."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'expected latents (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}')
        if tuple(x.shape[-2:]) != tuple(self.x_embedder.img_size):
            raise ValueError(f'expected {self.x_embedder.img_size[0]}x{self.x_embedder.img_size[1]} latents, '
                             f'got {x.shape[-2]}x{x.shape[-1]}')
        t = self.schedule.timesteps(t, x.shape[0], x.device)
        y = _check_labels(torch.as_tensor(y, device=x.device).reshape(-1).expand(x.shape[0]).long(), self.y_embedder)
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y, train=self.training)  # (B, D)
        hidden = []
        for blk in self.blocks:
            h = blk(h, c)
            hidden.append(h)
        out = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return unpatchify(out, self.patch_size, self.x_embedder.grid_size, self.out_channels), hidden

    def forward(self, x: torch.Tensor, t: Any, y: Any) -> torch.Tensor:
        return self.forward_hidden(x, t, y)[0]


def _check_labels(y: torch.Tensor, embedder: LabelEmbedder) -> torch.Tensor:
    rows = embedder.embedding_table.num_embeddings
    if ((y < 0) | (y >= rows)).any():
        raise ValueError(f'label y must be in [0, {rows}) ({embedder.null_label} = the null label), '
                         f'got {y.flatten()[:4].tolist()}')
    return y


class DiTEncoder(AdaLNViT):
    """The first blocks of a DiT, conditioned on a fixed timestep and label (default: the null label).

    State dict keys are ``AdaLNViT``'s (``patch_embed`` for DiT's ``x_embedder``) plus ``y_embedder``.
    """

    latent_input = True  # its weights take SD-VAE latents (images go through vae=)

    default_t = 121.0  # DDAE's best t for DiT-XL/2 features on CIFAR-10

    def __init__(self, *args: Any, num_labels: int = 1000, y: int = 1000, class_dropout_prob: float = 0.1,
                 **kwargs: Any) -> None:
        kwargs.setdefault('adaln_hidden_ratio', None)
        kwargs.setdefault('schedule', 'ddpm')
        super().__init__(*args, **kwargs)
        self.y_embedder = LabelEmbedder(num_labels, self.embed_dim, class_dropout_prob)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.y = int(_check_labels(torch.as_tensor([y], device='cpu'), self.y_embedder)[0])

    def _channel_hint(self) -> str:
        h, w = self.patch_embed.img_size
        return (f'. A DiT encoder runs on SD-VAE latents ({self.in_chans} x {h} x {w} for {8 * h} px images): encode '
                f'images with the VAE first, or create the model with vae="stabilityai/sd-vae-ft-ema" (or a diffusers '
                f'AutoencoderKL) to pass RGB images in [-1, 1]')

    def condition(self, t: torch.Tensor, y: Any = None) -> torch.Tensor:
        if y is None:
            y = torch.full_like(t, self.y, dtype=torch.long)
        else:
            y = _check_labels(torch.as_tensor(y, device=t.device).reshape(-1).long(), self.y_embedder)
        return self.t_embedder(t) + self.y_embedder(y)

    def _condition64(self, t64: torch.Tensor) -> torch.Tensor:
        label = self.y_embedder.embedding_table.weight[self.y].detach().to('cpu', torch.float64)
        return super()._condition64(t64) + label[None]


# -- converters -------------------------------------------------------------------------------------------

# Layers with a weight and a bias, by name: (official, diffusers). The timestep embedder sits under every block's
# ``norm1.emb.`` in diffusers, the attention's qkv is split into to_q / to_k / to_v.
_LAYERS = (('x_embedder.proj', 'pos_embed.proj'), ('final_layer.adaLN_modulation.1', 'proj_out_1'),
           ('final_layer.linear', 'proj_out_2'))
_BLOCK_LAYERS = (('adaLN_modulation.1', 'norm1.linear'), ('attn.proj', 'attn1.to_out.0'), ('mlp.fc1', 'ff.net.0.proj'),
                 ('mlp.fc2', 'ff.net.2'))
_T_EMBEDDER = (('t_embedder.mlp.0', 'timestep_embedder.linear_1'), ('t_embedder.mlp.2', 'timestep_embedder.linear_2'))
_LABELS = ('y_embedder.embedding_table.weight', 'class_embedder.embedding_table.weight')


def _copy(sd: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor], pairs: Any) -> None:
    for src, dst in pairs:
        for p in ('weight', 'bias'):
            out[f'{dst}.{p}'] = sd[f'{src}.{p}']


def _depth(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    return 1 + max(int(k.split('.')[1]) for k in sd if k.startswith(prefix))


def dit_official_to_diffusers(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official DiT state dict -> diffusers ``DiTTransformer2DModel`` (the timestep and label embedders are
    copied into every block, as diffusers keeps one per block; the position embedding is not stored)."""
    out: Dict[str, torch.Tensor] = {}
    _copy(sd, out, _LAYERS)
    for i in range(_depth(sd, 'blocks.')):
        b, o = f'blocks.{i}.', f'transformer_blocks.{i}.'
        _copy(sd, out, [(src, f'{o}norm1.emb.{dst}') for src, dst in _T_EMBEDDER])
        out[f'{o}norm1.emb.{_LABELS[1]}'] = sd[_LABELS[0]]
        for name, w, bias in zip(('to_q', 'to_k', 'to_v'), sd[b + 'attn.qkv.weight'].chunk(3, dim=0),
                                 sd[b + 'attn.qkv.bias'].chunk(3, dim=0)):
            out[f'{o}attn1.{name}.weight'], out[f'{o}attn1.{name}.bias'] = w, bias
        _copy(sd, out, [(b + src, o + dst) for src, dst in _BLOCK_LAYERS])
    return out


def dit_diffusers_to_official(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """diffusers ``DiTTransformer2DModel`` state dict -> official DiT layout (without ``pos_embed``).

    The per-block copies of the timestep and label embedders must be equal (they are in every converted
    checkpoint); the first block's are kept.
    """
    out: Dict[str, torch.Tensor] = {}
    _copy(sd, out, [(dst, src) for src, dst in _LAYERS])
    emb0 = 'transformer_blocks.0.norm1.emb.'
    _copy(sd, out, [(emb0 + dst, src) for src, dst in _T_EMBEDDER])
    out[_LABELS[0]] = sd[emb0 + _LABELS[1]]
    for i in range(_depth(sd, 'transformer_blocks.')):
        b, o = f'blocks.{i}.', f'transformer_blocks.{i}.'
        for key in [k for k in sd if k.startswith(o + 'norm1.emb.')]:
            if not torch.equal(sd[key], sd[emb0 + key[len(o + 'norm1.emb.'):]]):
                raise ValueError(f'diffusers DiT checkpoint has different embedders in block {i} ({key}); '
                                 f'the official layout has one shared embedder')
        for p in ('weight', 'bias'):
            out[f'{b}attn.qkv.{p}'] = torch.cat([sd[f'{o}attn1.to_{n}.{p}'] for n in 'qkv'], dim=0)
        _copy(sd, out, [(o + dst, b + src) for src, dst in _BLOCK_LAYERS])
    return out


def dit_checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official or diffusers DiT state dict (unwrapped) -> the state dict of ``DiT`` or of a ``DiTEncoder``.

    For an encoder: ``x_embedder`` becomes ``patch_embed``, blocks past the encoder's depth and the final layer are
    dropped. The fixed position embedding is always the model's own (recomputed, not loaded).
    """
    sd = dit_diffusers_to_official(state_dict) if any(k.startswith('transformer_blocks.') for k in state_dict) \
        else dict(state_dict)
    sd['pos_embed'] = model.pos_embed.detach().clone()
    if isinstance(model, DiT):
        return sd
    depth = len(model.blocks)
    out = {}
    for k, v in sd.items():
        if k.startswith('final_layer.') or (k.startswith('blocks.') and int(k.split('.')[1]) >= depth):
            continue
        out[k.replace('x_embedder.', 'patch_embed.', 1)] = v
    return out


# -- construction -----------------------------------------------------------------------------------------

def _list_dits() -> List[str]:
    return sorted(DIT_CONFIGS)


def create_dit(name: str, pretrained: bool = False, checkpoint: Optional[str] = None,
               cache_dir: Optional[str] = None, **kwargs: Any) -> DiT:
    """The full DiT ``name`` (``dit_xl_patch2_256`` ...), optionally with weights.

    ``pretrained=True`` loads the arch's default tag (``NAME.TAG`` picks another); ``checkpoint`` loads a file in
    either layout (a training checkpoint's EMA weights when it has them). Both go through the safe loader.
    """
    arch = split_name(name)[0]
    if arch not in DIT_CONFIGS:
        raise ValueError(f'unknown DiT {name!r}; known: {", ".join(_list_dits())}')
    model = DiT(**{**DIT_CONFIGS[arch], **kwargs})
    if checkpoint or pretrained:
        cfg = dict(file=str(checkpoint)) if checkpoint else pretrained_cfg_for(name)
        load_pretrained(model, cfg, filter_fn=dit_checkpoint_filter_fn, cache_dir=cache_dir)
    return model


def _create_dit_encoder(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    cfg = DIT_CONFIGS[variant]
    args = dict(img_size=cfg['input_size'], patch_size=cfg['patch_size'], in_chans=4, embed_dim=cfg['hidden_size'],
                depth=cfg['depth'] // 2, num_heads=cfg['num_heads'])
    return build_model(DiTEncoder, variant, pretrained, {**args, **kwargs}, filter_fn=dit_checkpoint_filter_fn,
                       input_stage=lambda m, **kw: DiffusionInput(m, vae_scale=SD_VAE_SCALE, **kw))


def _cfg(res: int, **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 0, 'input_size': (4, res // 8, res // 8), 'pool_size': None,
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': (0.0, 0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0, 1.0),  # SD-VAE latents * 0.18215
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2212.09748', 'paper_name': 'Scalable Diffusion Models with Transformers',
        'origin_url': 'https://github.com/facebookresearch/DiT',
        **kwargs,
    }


_DIT_NOTES = ('trained on ImageNet-1k with class labels (class-conditional DiT); the encoders use the null label',
              'inputs are SD-VAE latents (stabilityai/sd-vae-ft-ema, scale 0.18215) unless vae= is given')
_DIT_WEIGHTS = dict(license='cc-by-nc-4.0', notes=_DIT_NOTES)

default_cfgs = generate_default_cfgs({
    # an architecture with released weights is listed by its tags only (no untagged duplicate)
    **{name: _cfg(int(name.rsplit('_', 1)[1])) for name in DIT_CONFIGS if not name.startswith('dit_xl_patch2_')},
    # The released DiT-XL/2 weights (FID 2.27 at 256 px, 3.04 at 512 px with guidance), official state dicts.
    'dit_xl_patch2_256.fb_in1k': _cfg(256, url='https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt',
                                      **_DIT_WEIGHTS),
    'dit_xl_patch2_512.fb_in1k': _cfg(512, url='https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt',
                                      **_DIT_WEIGHTS),
    # The same weights in diffusers' layout on the Hugging Face hub.
    'dit_xl_patch2_256.fb_in1k_diffusers': _cfg(256, hf_hub_id='facebook/DiT-XL-2-256',
                                                hf_hub_filename='transformer/diffusion_pytorch_model.safetensors',
                                                **_DIT_WEIGHTS),
    'dit_xl_patch2_512.fb_in1k_diffusers': _cfg(512, hf_hub_id='facebook/DiT-XL-2-512',
                                                hf_hub_filename='transformer/diffusion_pytorch_model.safetensors',
                                                **_DIT_WEIGHTS),
})


register_family('dit', __name__, {n: n for n in DIT_CONFIGS}, _create_dit_encoder, full_model=create_dit, docs={
    n: f'DiT-{n.split("_")[1].upper()}/{c["patch_size"]} encoder on {8 * c["input_size"]} px images (SD-VAE latents '
       f'{c["input_size"]}x{c["input_size"]}x4): the first {c["depth"] // 2} of {c["depth"]} blocks, width '
       f'{c["hidden_size"]}, t = 121, null label.'
    for n, c in DIT_CONFIGS.items()})
