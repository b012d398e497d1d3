"""The one builder of the zoo: registration, creation, the pretrained cfg of a name, loading.

Every family file (``ldae_vit.py``, ``dit.py``, ``ddae_unet.py``) holds one table of configurations and one
``default_cfgs``; ``register_family`` turns the table into timm entrypoints (``timm.create_model(name)``), all of
which build through ``build_model``:

1. the model is built with timm's ``build_model_with_cfg`` (on the meta device when it is about to be replaced
   by a merged skeleton: a merged model without weights needs no fold of random numbers);
2. weights load through ``hub.load_pretrained`` (sha256, safe reading, strict load); a merged encoder's own
   checkpoint (a plain timm ViT: what timm's fine-tuning writes) loads straight into the merged model;
3. a mergeable encoder is merged at its t (``merged=True``, the default), the input stage is added
   (``vae=``: then the input is RGB images, ``noisy_input=``), ``features_only`` wraps it;
4. the call's model arguments are recorded (``_model_args``) for ``save_pretrained``.

``pretrained_cfg_for(name)`` resolves a name to its cfg (``arch``, ``arch.tag``, alias), ``names_weights(name)`` says
whether a name asks for weights (a tag, ``hf-hub:``, ``local-dir:``) and ``has_weights(name)`` whether bytes exist
for it: the command line and the full-model builders (``create_dae``, ``create_dit``) use only these.
"""
import contextlib
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet

from ..hub.loading import FilterFn, load_pretrained, read_pretrained
from ..hub.sources import weight_source

__all__ = ['build_model', 'load_model', 'full_model', 'register_family', 'list_models', 'pretrained_cfg_for', 'names_weights', 'has_weights',
           'split_name', 'NOT_MODEL_ARGS']

# create_model keyword arguments that say where weights come from or how to wrap, not how to build the network
NOT_MODEL_ARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'pretrained_model_args', 'features_only',
                  'out_indices', 'feature_cls', 'vae', 'vae_sample', 'device', 'dtype')
# family name -> registered model names, in registration order
_FAMILIES: Dict[str, List[str]] = {}
_VARIANT: Dict[str, str] = {}  # registered name -> the variant it builds (an alias names another)
_FULL_MODEL: Dict[str, Callable[..., nn.Module]] = {}  # registered name -> its family's full-model builder


def register_family(family: str, module: str, names: Dict[str, str], create: Callable[..., nn.Module],
                    docs: Dict[str, str], full_model: Callable[..., nn.Module]) -> None:
    """Register a timm entrypoint for every ``name -> variant`` of a family (an alias maps to another variant).

    Each entrypoint is ``name(pretrained=False, **kwargs)``, builds ``variant`` through ``create`` and carries its
    line of ``docs`` as its docstring. The module's ``default_cfgs`` must exist already (timm reads it here).
    ``full_model(name, pretrained=False, checkpoint=None, **kwargs)`` builds the family's whole model (the DAE, the
    full DiT, the UNet): what trains and what ``full_model`` returns.
    """
    import sys
    cfgs = sys.modules[module].default_cfgs
    for name, variant in names.items():
        if name != variant and name not in cfgs and variant in cfgs:  # an alias: its variant's cfgs, under its name
            cfgs[name] = cfgs[variant]
        def entrypoint(pretrained: bool = False, _variant: str = variant, **kwargs: Any) -> nn.Module:
            return create(_variant, pretrained=pretrained, **kwargs)
        entrypoint.__name__ = entrypoint.__qualname__ = name
        entrypoint.__module__ = module
        entrypoint.__doc__ = docs[name]
        register_model(entrypoint)
        _VARIANT[name] = variant
        _FULL_MODEL[name] = full_model
        _FAMILIES.setdefault(family, []).append(name)


def list_models(family: Optional[str] = None) -> List[str]:
    """The zoo's registered names (one family's: ``'ldae'``, ``'dit'``, ``'ddae'``)."""
    if family is not None:
        return list(_FAMILIES.get(family, []))
    return [n for names in _FAMILIES.values() for n in names]


def full_model(name: str, pretrained: bool = False, checkpoint: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """The whole model of a registered name (``NAME[.TAG]``): the l-DAE with its decoder and tokenizer, the full DiT,
    the UNet; ``pretrained`` loads the tag's weights (all of them), ``checkpoint`` a file of the whole model."""
    arch = split_name(name)[0]
    if arch not in _FULL_MODEL:
        raise ValueError(_unknown_model(arch))
    return _FULL_MODEL[arch](name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)


def split_name(name: str) -> Tuple[str, str]:
    """``'arch.tag'`` -> (arch, tag); a hub or local-dir name has no tag."""
    if name.startswith(('hf-hub:', 'local-dir:')):
        return name, ''
    arch, _, tag = name.partition('.')
    return arch, tag


def names_weights(name: str) -> bool:
    """Whether a model name asks for weights by itself: it carries a tag, or is ``hf-hub:`` / ``local-dir:``.

    This is the command line's default for ``--pretrained``: a bare architecture name gives random weights.
    """
    return name.startswith(('hf-hub:', 'local-dir:')) or bool(split_name(name)[1])


def pretrained_cfg_for(name: str) -> Dict[str, Any]:
    """The pretrained cfg a name resolves to (the arch's default tag for a bare name), as a dict.

    Raises:
        ValueError: an unknown model, or a tag that the architecture does not have (the known tags are listed).
    """
    import timm
    from timm.models import get_pretrained_cfg, is_model
    arch, tag = split_name(name)
    if not is_model(arch):
        raise ValueError(_unknown_model(arch))
    arch = _VARIANT.get(arch, arch)
    cfg = None
    if tag:
        try:
            cfg = get_pretrained_cfg(f'{arch}.{tag}')
        except RuntimeError:  # timm: an invalid tag for a known architecture
            cfg = None
    if tag and cfg is None:
        tags = timm.list_pretrained(arch + '.*') or ['none']
        raise ValueError(f'unknown pretrained tag {name!r}; the tags of {arch} are: {", ".join(tags)}')
    if cfg is None:
        cfg = get_pretrained_cfg(arch)
    if cfg is None:
        raise ValueError(f'{arch} has no pretrained cfg (a model of another library?)')
    return cfg.to_dict()


def has_weights(name: str) -> bool:
    """Whether bytes exist somewhere for a name (a tag with a source, or a hub / local folder)."""
    if name.startswith(('hf-hub:', 'local-dir:')):
        return True
    return weight_source(pretrained_cfg_for(name)) is not None


def load_model(name: str, pretrained: Optional[bool] = None, checkpoint: Optional[str] = None,
               **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with the zoo's defaults, for the command line and the benchmarks.

    ``pretrained`` defaults to whether the name asks for weights (``names_weights``); ``checkpoint`` loads your own
    file into the architecture (any layout its filter reads). An unknown model or tag raises a ValueError naming it.
    """
    import timm
    if not name.startswith(('hf-hub:', 'local-dir:')):
        pretrained_cfg_for(name)  # raises for an unknown model or tag
    if checkpoint:
        kwargs['pretrained_cfg_overlay'] = dict(file=str(checkpoint))
    pretrained = (bool(checkpoint) or names_weights(name)) if pretrained is None else pretrained
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _unknown_model(name: str) -> str:
    import difflib
    zoo = list_models()
    close = difflib.get_close_matches(name, zoo, n=3, cutoff=0.6)
    hint = f'; did you mean {" or ".join(close)}?' if close else '; `ldae-models list` shows them all'
    return f'unknown model {name!r}{hint}'


def build_model(
        cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        kwargs: Dict[str, Any],
        filter_fn: Optional[FilterFn] = None,
        input_stage: Optional[Callable[..., nn.Module]] = None,
) -> nn.Module:
    """What every entrypoint does (see the module docstring).

    Keyword arguments beyond the model's own: ``merged`` (mergeable encoders; default True), ``noisy_input``,
    ``vae`` / ``vae_sample`` (families whose ``input_stage`` takes a VAE), ``features_only``, ``out_indices``, ``cache_dir``,
    and timm's ``device`` / ``dtype``: the model is built on ``device`` (parameters created there, weights loaded
    there; ``'meta'`` builds no storage) and cast to ``dtype`` after the load and the merge.
    """
    call_args = {k: v for k, v in kwargs.items() if k not in NOT_MODEL_ARGS}
    device, dtype = kwargs.pop('device', None), kwargs.pop('dtype', None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _build(cls, variant, pretrained, kwargs, filter_fn, input_stage, call_args)
    if dtype is not None:  # after the load and the merge, which fold in float64 and float32
        model = model.to(dtype=dtype)
    return model


def _build(cls: Type[nn.Module], variant: str, pretrained: bool, kwargs: Dict[str, Any],
           filter_fn: Optional[FilterFn], input_stage: Optional[Callable[..., nn.Module]],
           call_args: Dict[str, Any]) -> nn.Module:
    mergeable = hasattr(cls, 'merge')
    merged = kwargs.pop('merged', mergeable)
    if merged and not mergeable:
        raise ValueError(f'{variant} cannot be merged (merged=True): it has no fixed-t form')
    features_only = kwargs.pop('features_only', False)
    out_indices = kwargs.pop('out_indices', None)
    cache_dir = kwargs.pop('cache_dir', None)
    feature_cls = kwargs.pop('feature_cls', None)  # 'getter' (default: forward_intermediates) or 'fx'
    vae = kwargs.pop('vae', None)
    vae_sample = kwargs.pop('vae_sample', False)
    noisy_input = kwargs.pop('noisy_input', None)  # None: the model's own default
    if vae is not None:
        if input_stage is None:
            raise ValueError(f'{variant}: vae= is for latent-diffusion encoders (DiT)')
        from .wrappers import load_vae
        vae = load_vae(vae)
        latent = int(getattr(getattr(vae, 'config', None), 'latent_channels', 4))
        if kwargs.get('in_chans', 3) not in (3, latent):  # timm's scripts pass in_chans=3: the images' channels
            raise ValueError(f'{variant} with vae=: the input is RGB images (in_chans=3), got in_chans='
                             f'{kwargs["in_chans"]}')
        kwargs['in_chans'] = latent  # what the encoder behind the VAE takes

    skeleton = merged and not pretrained
    with torch.device('meta') if skeleton else contextlib.nullcontext():
        own_input = noisy_input is not None and not (merged or vae is not None)  # the model noises by itself
        base = build_model_with_cfg(cls, variant, pretrained=False, **kwargs,
                                    **({'noisy_input': noisy_input} if own_input else {}))
    noisy_input = bool(noisy_input)
    if merged and noisy_input and not base.noise_is_schedule_only:
        raise ValueError(f"{variant}: a merged l-DAE encoder cannot add l-DAE's latent noise (the PCA tokenizer stays "
                         f'with the conditional encoder): pass merged=False with noisy_input=True')
    cfg = _model_cfg(base)
    model = base
    if pretrained:
        _warn_pixels_for_latent_weights(variant, cfg, base, vae)
        weights = read_pretrained(cfg, cache_dir)
        if merged and _merged_form(weights[0]):  # a merged (plain timm ViT) checkpoint: timm's fine-tuned weights
            from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter
            model = base.merged_skeleton()
            load_pretrained(model, cfg, filter_fn=vit_filter, weights=weights)
        else:
            load_pretrained(base, cfg, filter_fn=filter_fn, weights=weights)
            model = base.merge() if merged else base
    elif merged:
        model = base.merged_skeleton()
    base.pretrained_cfg = base.default_cfg = cfg
    model.pretrained_cfg = model.default_cfg = cfg
    if vae is not None or (merged and noisy_input):
        from .wrappers import DiffusionInput
        stage = input_stage or DiffusionInput
        model = stage(model, noisy_input=noisy_input, vae=vae, vae_sample=vae_sample)
    model._model_args = {**call_args, 'merged': merged}
    if features_only:
        model = features_only_net(model, out_indices, feature_cls)
    elif feature_cls is not None:
        raise ValueError(f'{variant}: feature_cls={feature_cls!r} is for features_only=True')
    return model


def _model_cfg(base: nn.Module) -> Dict[str, Any]:
    """The pretrained cfg of a built model: its default tag's (as timm's models carry, weights or not), with the input
    the model really takes (its channels and size; the mean and std of as many channels)."""
    cfg = dict(base.pretrained_cfg)
    if hasattr(base, 'input_size'):
        cfg['input_size'] = tuple(base.input_size())
    channels = cfg['input_size'][0] if cfg.get('input_size') else None
    if channels and len(cfg.get('mean') or ()) != channels:  # another in_chans than the tag's
        if channels == 3:  # images in [-1, 1], as every pixel model of the zoo takes them
            cfg['mean'], cfg['std'] = (0.5,) * 3, (0.5,) * 3
        else:
            cfg['mean'], cfg['std'] = (cfg['mean'][0],) * channels, (cfg['std'][0],) * channels
    if hasattr(base, 'pool_size'):  # a model whose features are maps (a UNet's out_k)
        cfg['pool_size'] = base.pool_size()
    return cfg


def _merged_form(state: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is a merged encoder's (a plain timm ViT: affine norms, no adaLN modulation, no timestep
    MLP), as timm's fine-tuning writes it, rather than the conditional encoder's."""
    return 'blocks.0.norm1.weight' in state and not any('adaLN_modulation' in k or k.startswith('t_embedder.')
                                                          for k in state)


def _warn_pixels_for_latent_weights(variant: str, cfg: Dict[str, Any], base: nn.Module, vae: Any) -> None:
    """Weights trained on latents, loaded into a model that takes pixels without a VAE: said, not silent."""
    import warnings
    tag_chans = base.pretrained_cfg.get('input_size', (None,))[0]
    if vae is None and getattr(base, 'latent_input', False) and cfg['input_size'][0] != tag_chans:
        warnings.warn(f'{variant}: its weights take SD-VAE latents ({tag_chans} channels); in_chans='
                      f'{cfg["input_size"][0]} adapts the first convolution (timm\'s adapt_input_conv), which is not '
                      f'what they were trained on. To feed images, pass vae="stabilityai/sd-vae-ft-ema" (timm\'s '
                      f'train.py: --model-kwargs vae=stabilityai/sd-vae-ft-ema)', stacklevel=3)


def features_only_net(model: nn.Module, out_indices: Any, feature_cls: Optional[str] = None) -> nn.Module:
    """timm's ``features_only`` form. ``feature_cls`` None or ``'getter'``: the model's own (a UNet's decoder maps),
    else timm's getter on ``forward_intermediates`` (NCHW maps). ``'fx'``: a graph extractor on a torch.fx trace, for
    the models fx can trace (the merged encoders: their blocks' token outputs, (B, N, C); a UNet without noisy input:
    its decoder maps); the others refuse it with the reason."""
    cfg = model.pretrained_cfg
    if feature_cls not in (None, 'getter', 'fx'):
        raise ValueError(f"feature_cls={feature_cls!r} is not available for {type(model).__name__}: use 'getter' "
                         f"(the default, from forward_intermediates) or 'fx'")
    if feature_cls == 'fx' and hasattr(model, 'features_only_net') and getattr(model, 'fx_traceable', False):
        net = model.features_only_net(out_indices, feature_cls)  # a model that builds its own (a UNet's decoder)
    elif feature_cls == 'fx':
        if not getattr(model, 'fx_traceable', False):
            raise ValueError(f"feature_cls='fx' needs a model torch.fx can trace; {type(model).__name__} cannot: "
                             + getattr(model, 'fx_reason', 'its forward branches on values in Python')
                             + " (use the default feature_cls='getter', or merged=True where the family has it)")
        from timm.models._features import feature_take_indices
        from timm.models._features_fx import FeatureGraphNet
        take, _ = feature_take_indices(len(model.blocks), 3 if out_indices is None else out_indices)
        net = FeatureGraphNet(model, out_indices=tuple(take))
    elif hasattr(model, 'features_only_net'):
        net = model.features_only_net(out_indices)
    else:
        net = FeatureGetterNet(model, out_indices=3 if out_indices is None else out_indices, output_fmt='NCHW')
    net.pretrained_cfg = net.default_cfg = pretrained_cfg_for_features(cfg)
    return net
