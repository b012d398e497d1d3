"""Reading checkpoints safely and loading them into a model, strictly.

``load_pretrained(model, cfg, filter_fn)`` is the one loading path of the zoo, whatever the source:

1. the cfg's source gives the bytes (``sources.weight_source``: found or fetched, sha256 checked);
2. they are read safely (``read_checkpoint``): safetensors with ``safetensors``, anything else only with
   ``torch.load(weights_only=True)``, which refuses to unpickle code; a file that is neither gets a
   ``CheckpointError`` naming it;
3. a training checkpoint is unwrapped once (``unwrap_state_dict``: the EMA weights when it carries them);
4. the model's filter converts the layout (each family's ``checkpoint_filter_fn``);
5. the state dict is loaded strictly: any missing key, unexpected key or shape mismatch raises a
   ``CheckpointMismatchError`` listing them all, instead of a silent partial load.
"""
import argparse
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .sources import CheckpointError, PathLike, SourceError, weight_source

__all__ = ['CheckpointMismatchError', 'read_checkpoint', 'unwrap_state_dict', 'load_state_dict_strict',
           'load_pretrained', 'FilterFn']

FilterFn = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]
# Where training checkpoints keep their weights, the EMA first (ours: 'ema'; timm: 'model_ema'; DDAE: 'EMA').
_EMA_KEYS = ('ema', 'model_ema', 'EMA')
_MODEL_KEYS = ('model', 'state_dict', 'MODEL', 'module')
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel, torch.compile


class CheckpointMismatchError(CheckpointError):
    """A state dict whose keys or shapes differ from the model's."""


def _is_safetensors(path: Path) -> bool:
    if path.suffix == '.safetensors':
        return True
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{'  # 8-byte little-endian header size, then JSON


def _read_sharded(index_path: Path) -> Dict[str, Any]:
    """A sharded safetensors checkpoint (Hugging Face's ``model.safetensors.index.json``: a ``weight_map`` from each
    key to its shard file, beside the index)."""
    import json
    try:
        weight_map = json.loads(index_path.read_text())['weight_map']
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'{index_path} is not a safetensors shard index (no weight_map): {e}') from None
    state: Dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        part = read_checkpoint(index_path.parent / shard)
        state.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f'{index_path}: the shards lack {len(missing)} keys of the index, e.g. {missing[:3]}')
    return state


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint file safely: safetensors (also sharded, through its ``.index.json``), else
    ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: a missing, truncated or corrupt file, a file that is not a checkpoint at all, or a pickle
            that holds anything but tensors and plain containers (refused: no code in it runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    if path.name.endswith('.index.json'):
        return _read_sharded(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 -- SafetensorError, OSError, ...: one message naming the file
            raise CheckpointError(f'{path} is not a readable safetensors file (truncated or corrupt?): {e}') from None
    try:
        state = _torch_load(path)
    except pickle.UnpicklingError as e:
        unsafe = [ln.strip() for ln in str(e).splitlines() if 'Unsupported global' in ln]
        if unsafe:
            raise CheckpointError(f'refusing to load {path}: it is a pickle that references code or objects other '
                                  f'than tensors and plain containers ({unsafe[0]}); weights_only loading does not '
                                  f'unpickle them, so nothing in it was run. Convert trusted files to safetensors.'
                                  ) from None
        raise CheckpointError(f'{path} is not a readable checkpoint (truncated, corrupt, or not a torch file)') from None
    except Exception as e:  # noqa: BLE001 -- a text file, a zip of something else: whatever torch raises
        raise CheckpointError(f'{path} is not a readable checkpoint (truncated, corrupt, or not a torch or '
                              f'safetensors file): {type(e).__name__}: {e}') from None
    if not isinstance(state, dict):
        raise CheckpointError(f'{path} holds a {type(state).__name__}, not a state dict or a training checkpoint')
    return state


# Plain data classes a training checkpoint may hold besides tensors and containers: timm's train.py saves its
# arguments as an argparse.Namespace (a bag of plain values; unpickling it runs no code of the file's).
SAFE_CLASSES = (argparse.Namespace,)


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, with ``SAFE_CLASSES`` allowed where this torch can allow classes."""
    allow = getattr(torch.serialization, 'safe_globals', None)
    if allow is None:  # torch < 2.5: tensors and containers only
        return torch.load(path, map_location='cpu', weights_only=True)
    with allow(list(SAFE_CLASSES)):
        return torch.load(path, map_location='cpu', weights_only=True)


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def unwrap_state_dict(checkpoint: Dict[str, Any], prefer_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint, wrapper prefixes stripped.

    Looks under the EMA keys first (``ema``, ``model_ema``, ``EMA``) when ``prefer_ema``, then ``model``,
    ``state_dict``, ``MODEL``, ``module``; keys lose ``module.`` (DDP) and ``_orig_mod.`` (torch.compile); an encoder
    saved with its VAE in front keeps the encoder's (``model.*``); entries that are not tensors (step counters,
    arguments) are dropped. A plain state dict passes through.
    """
    keys = (_EMA_KEYS if prefer_ema else ()) + _MODEL_KEYS + (() if prefer_ema else _EMA_KEYS)
    sd = next((checkpoint[k] for k in keys if _tensor_dict(checkpoint.get(k))), checkpoint)
    if any(k.startswith('vae.') for k in sd) and any(k.startswith('model.') for k in sd):
        # an encoder saved with its VAE in front (``vae=``): the encoder's weights; the VAE is loaded by name
        sd = {k[len('model.'):]: v for k, v in sd.items() if k.startswith('model.')}
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def load_state_dict_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor], what: str = 'checkpoint',
                           allow_missing: Iterable[str] = ()) -> None:
    """Load with every problem reported at once: missing keys, unexpected keys, shape mismatches."""
    own = model.state_dict()
    allow = tuple(allow_missing)
    missing = [k for k in own if k not in state_dict and not k.startswith(allow)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def fmt(items: List[str]) -> str:
            return ', '.join(items[:12]) + (f' ... ({len(items)} in all)' if len(items) > 12 else '')
        lines = [f'{what} does not fit {type(model).__name__} (a checkpoint of another model or size?):']
        if missing:
            lines.append(f'  missing keys: {fmt(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys: {fmt(unexpected)}')
        if shapes:
            lines.append(f'  shape mismatches: {fmt(shapes)}')
        raise CheckpointMismatchError('\n'.join(lines))
    model.load_state_dict(state_dict, strict=False)


def _adapt_first_conv(model: nn.Module, state: Dict[str, torch.Tensor], first_conv: Optional[str]
                      ) -> Dict[str, torch.Tensor]:
    """A model made for other input channels (``in_chans=1``, 4, ...) than its checkpoint: the first convolution's
    weight adapted as timm does (``timm.models.adapt_input_conv``: summed to one channel, or repeated and rescaled)."""
    key = f'{first_conv}.weight' if first_conv else None
    if key is None or key not in state:
        return state
    mine = model.state_dict().get(key)
    if mine is None or mine.dim() != 4 or mine.shape[1] == state[key].shape[1]:
        return state
    import inspect
    from timm.models import adapt_input_conv
    theirs = state[key]
    if 'base_chans' in inspect.signature(adapt_input_conv).parameters:  # timm >= 1.0.2x: any checkpoint channels
        return {**state, key: adapt_input_conv(mine.shape[1], theirs, base_chans=theirs.shape[1])}
    if theirs.shape[1] != 3:
        raise CheckpointMismatchError(f'{key}: adapting a {theirs.shape[1]}-channel first convolution to '
                                      f'{mine.shape[1]} channels needs a newer timm (adapt_input_conv with base_chans)')
    return {**state, key: adapt_input_conv(mine.shape[1], theirs)}


def read_pretrained(pretrained_cfg: Dict[str, Any], cache_dir: Optional[PathLike] = None
                    ) -> Tuple[Dict[str, torch.Tensor], str]:
    """(the unwrapped state dict, where it came from) of the weights a pretrained cfg names."""
    cfg = dict(pretrained_cfg)
    if cfg.get('state_dict') is not None:
        return unwrap_state_dict(cfg['state_dict']), 'state_dict'
    source = weight_source(cfg)
    if source is None:
        name = cfg.get('architecture', 'this model') + (f".{cfg['tag']}" if cfg.get('tag') else '')
        raise SourceError(f'no pretrained weights exist for {name}; use pretrained=False, or '
                          f'pretrained_cfg_overlay=dict(file=...) for your own file')
    path = source.fetch(cache_dir)
    return unwrap_state_dict(read_checkpoint(path)), str(path)


def load_pretrained(
        model: nn.Module,
        pretrained_cfg: Dict[str, Any],
        filter_fn: Optional[FilterFn] = None,
        cache_dir: Optional[PathLike] = None,
        weights: Optional[Tuple[Dict[str, torch.Tensor], str]] = None,
) -> nn.Module:
    """Load the weights a pretrained cfg names (or ``weights``: ``read_pretrained``'s answer) into ``model`` (the
    steps are in the module docstring). The file's classifier is loaded where its shape is the model's head's; a head
    of another size (or none in the model) starts fresh."""
    cfg = dict(pretrained_cfg)
    state, what = weights if weights is not None else read_pretrained(cfg, cache_dir)
    if filter_fn is not None:
        state = filter_fn(state, model)
    state = _adapt_first_conv(model, state, cfg.get('first_conv'))
    allow_missing: Tuple[str, ...] = ()
    classifier = cfg.get('classifier')
    if classifier:
        own = model.state_dict()
        theirs = [k for k in state if k.startswith(classifier + '.')]
        if not (theirs and all(k in own and own[k].shape == state[k].shape for k in theirs)):
            state = {k: v for k, v in state.items() if k not in theirs}  # another head (or none): the model's own
            allow_missing = (classifier + '.',)
    load_state_dict_strict(model, state, what=what, allow_missing=allow_missing)
    return model
