"""Pretrained weights: one safe loading path for every source, sha256 checks, publishing and export.

Weights are data. Every model file lists its tags as timm pretrained cfgs (``arch.tag``) next to its
architectures; a cfg names its source (``hf_hub_id``, ``url`` or ``file``, a file shipped inside the
package being a ``file`` made by ``packaged_file``), its license and papers, and, where the bytes are
known, their sha256 as a note ``'sha256:<hex>'`` (timm's cfg has no field of its own for it; a note
travels with the cfg into ``config.json`` and back).

Loading (``load_pretrained``), whatever the source:

1. the bytes are found or fetched (Hugging Face hub through ``huggingface_hub`` and its cache, which
   works offline with ``HF_HUB_OFFLINE=1``; URLs into the torch hub cache; local files and folders);
2. their sha256 is checked when the cfg knows it; a downloaded file that fails is deleted;
3. safetensors files are read with ``safetensors``; anything else only with
   ``torch.load(weights_only=True)``, which refuses to unpickle code;
4. the model's filter function unwraps and converts the layout (``checkpoint_filter_fn``);
5. the state dict is loaded strictly; any missing key, unexpected key or shape mismatch raises a
   ``CheckpointMismatchError`` listing them all, instead of a silent partial load.
"""
import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn

__all__ = [
    'CheckpointError', 'CheckpointMismatchError', 'ChecksumError', 'packaged_file', 'cfg_sha256', 'sha256_of',
    'read_checkpoint', 'resolve_weights_file', 'load_pretrained', 'load_state_dict_strict', 'unwrap_state_dict',
    'save_pretrained', 'push_to_hub', 'export_timm', 'weights_available_offline',
]

PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / 'weights'
SAFETENSORS_NAME = 'model.safetensors'
PICKLE_NAME = 'pytorch_model.bin'
PathLike = Union[str, os.PathLike]
# create_model keyword arguments that say where weights come from, not how to build the model
_NOT_MODEL_ARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'pretrained_model_args', 'features_only',
                   'out_indices', 'feature_cls', 'vae')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class ChecksumError(CheckpointError):
    """The bytes of a checkpoint do not have the sha256 its pretrained cfg names."""


class CheckpointMismatchError(CheckpointError):
    """A state dict whose keys or shapes differ from the model's."""


# -- registry helpers -----------------------------------------------------------------------------

def packaged_file(name: str) -> str:
    """Path of a weight file shipped inside the package (``ldae_models/weights/NAME``)."""
    return str(PACKAGE_WEIGHTS_DIR / name)


def sha256_note(digest: str) -> str:
    return f'sha256:{digest.lower()}'


def cfg_sha256(cfg: Dict[str, Any]) -> Optional[str]:
    """The sha256 recorded in a pretrained cfg's notes, if any."""
    for note in cfg.get('notes') or ():
        if isinstance(note, str) and note.startswith('sha256:'):
            return note.split(':', 1)[1].strip().lower()
    return None


def _recorded_sha256(cfg: Dict[str, Any]) -> Optional[str]:
    """The sha256 that the cfg's own source must have.

    A tag's sha256 note belongs to the tag's source. When ``pretrained_cfg_overlay`` points the tag at another
    file (say, the output of your own training run) and brings no note of its own, the tag's note does not
    apply to it; an overlay that gives a different note is checked against that one. A cfg that names no
    registered tag keeps its note (e.g. a ``config.json`` written by ``save_pretrained``).
    """
    sha = cfg_sha256(cfg)
    arch = cfg.get('architecture')
    if not sha or not arch:
        return sha
    try:
        from timm.models import get_pretrained_cfg
        name = f"{arch}.{cfg['tag']}" if cfg.get('tag') else arch
        registered = get_pretrained_cfg(name, allow_unregistered=True)
    except Exception:  # noqa: BLE001 -- an unknown name: the note came with this cfg
        return sha
    if registered is None:
        return sha
    registered = registered.to_dict()
    if cfg_sha256(registered) != sha:
        return sha  # a note given with the overlay
    keys = ('file', 'hf_hub_id', 'hf_hub_filename', 'url')
    return sha if all(cfg.get(k) == registered.get(k) for k in keys) else None


def sha256_of(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


# -- fetching -------------------------------------------------------------------------------------

def _url_cache_dir(cache_dir: Optional[PathLike]) -> Path:
    return Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / 'checkpoints'


def _download_url(url: str, sha256: Optional[str], cache_dir: Optional[PathLike]) -> Path:
    """Download a URL into the cache (once), checking the sha256 of what arrives."""
    name = os.path.basename(urlparse(url).path) or 'checkpoint'
    dst = _url_cache_dir(cache_dir) / name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=None, progress=False)
    _verify(dst, sha256, delete=True, what=url)
    return dst


def _hf_download(repo_id: str, filename: Optional[str], cache_dir: Optional[PathLike]) -> Path:
    """``hf_hub_download`` of ``filename`` (default: model.safetensors, then pytorch_model.bin)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    revision = None
    if '@' in repo_id:
        repo_id, revision = repo_id.split('@', 1)
    if filename and filename.endswith('.safetensors'):  # safetensors first, then the pickle of the same name
        names = [filename, filename[:-len('.safetensors')] + '.bin']
    else:
        names = [filename] if filename else [SAFETENSORS_NAME, PICKLE_NAME]
    last: Optional[Exception] = None
    for name in names:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir))
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:
            last = e
    raise CheckpointError(f'no weights {" or ".join(names)} found for Hugging Face repo {repo_id!r} '
                          f'(offline: is it in the cache?): {last}')


def _delete_hf_cached(path: Path) -> None:
    """Delete a file of the Hugging Face cache: the snapshot link and the blob it points to."""
    blob = path.resolve()
    for p in {path, blob}:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _verify(path: Path, sha256: Optional[str], delete: bool, what: str, hf: bool = False) -> None:
    if not sha256:
        return
    got = sha256_of(path)
    if got != sha256:
        if delete:
            _delete_hf_cached(path) if hf else path.unlink(missing_ok=True)
        raise ChecksumError(f'sha256 mismatch for {what}: expected {sha256}, got {got}'
                            + ('; the downloaded file was deleted' if delete else ''))


def _file_in_dir(path: Path) -> Path:
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f'no {SAFETENSORS_NAME} or {PICKLE_NAME} in {path}')


def resolve_weights_file(cfg: Dict[str, Any], cache_dir: Optional[PathLike] = None) -> Path:
    """Find or fetch the weight file a pretrained cfg names, and check its sha256.

    The order is timm's: an ``hf-hub:`` or ``local-dir:`` model name, then ``file``, then ``hf_hub_id``,
    then ``url``.
    """
    sha256 = _recorded_sha256(cfg)
    source = cfg.get('source') or ''
    file, hf_id, url = cfg.get('file'), cfg.get('hf_hub_id'), cfg.get('url')
    if source == 'hf-hub' and hf_id:
        path = _hf_download(hf_id, cfg.get('hf_hub_filename'), cache_dir)
        _verify(path, sha256, delete=True, what=f'hf-hub:{hf_id}', hf=True)
        return path
    if file:
        path = Path(file)
        if path.is_dir():
            path = _file_in_dir(path)
        if not path.is_file():
            raise CheckpointError(f'weight file not found: {path}')
        _verify(path, sha256, delete=False, what=str(path))
        return path
    if hf_id:
        path = _hf_download(hf_id, cfg.get('hf_hub_filename'), cache_dir)
        _verify(path, sha256, delete=True, what=f'hf-hub:{hf_id}', hf=True)
        return path
    if url:
        return _download_url(url if isinstance(url, str) else url[0], sha256, cache_dir)
    name = cfg.get('architecture', 'this model')
    raise CheckpointError(f'no pretrained weights exist for {name}{"." + cfg["tag"] if cfg.get("tag") else ""}; '
                          f'use pretrained=False, or pretrained_cfg_overlay=dict(file=...) for your own file')


def weights_available_offline(cfg: Dict[str, Any], cache_dir: Optional[PathLike] = None) -> bool:
    """Whether the bytes of a pretrained cfg are on this machine (packaged, local, or cached)."""
    if cfg.get('file'):
        return Path(cfg['file']).exists()
    if cfg.get('hf_hub_id'):
        from huggingface_hub import try_to_load_from_cache
        repo = cfg['hf_hub_id'].split('@', 1)[0]
        for name in ([cfg['hf_hub_filename']] if cfg.get('hf_hub_filename') else [SAFETENSORS_NAME, PICKLE_NAME]):
            hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(hit, str):
                return True
    if cfg.get('url'):
        url = cfg['url'] if isinstance(cfg['url'], str) else cfg['url'][0]
        return (_url_cache_dir(cache_dir) / os.path.basename(urlparse(url).path)).is_file()
    return False


# -- reading --------------------------------------------------------------------------------------

def _is_safetensors(path: Path) -> bool:
    if path.suffix == '.safetensors':
        return True
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{'  # 8-byte little-endian header size, then JSON


def read_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint file safely: safetensors, else ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: a truncated or corrupt file, or a pickle that holds anything but tensors and
            plain containers (such a file is refused, and no code in it runs).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}')
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f'{path} is not a readable safetensors file (truncated or corrupt?): {e}') from e
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        globals_ = [ln.strip() for ln in str(e).splitlines() if 'Unsupported global' in ln]
        if globals_:
            raise CheckpointError(f'refusing to load {path}: it is a pickle that references code or objects other '
                                  f'than tensors and plain containers ({globals_[0]}); weights_only loading does not '
                                  f'unpickle them, so nothing in it was run. Convert trusted files to safetensors.') from e
        raise CheckpointError(f'{path} is not a readable checkpoint (truncated, corrupt, or not a torch file)') from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f'{path} is not a readable checkpoint (truncated or corrupt?): {e}') from e


def unwrap_state_dict(checkpoint: Dict[str, Any], prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Take the state dict out of a training checkpoint and strip wrapper prefixes.

    Looks under ``ema`` (when ``prefer_ema``), ``model``, ``state_dict``, ``model_ema``, ``ema``, in that
    order, and strips ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) from every key.
    """
    keys = (('ema', 'model_ema') if prefer_ema else ()) + ('model', 'state_dict', 'model_ema', 'ema', 'EMA', 'MODEL')
    sd = checkpoint
    for k in keys:
        if isinstance(sd.get(k), dict) and sd[k] and all(isinstance(v, torch.Tensor) for v in sd[k].values()):
            sd = sd[k]
            break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue  # optimizer step counters, epochs, args...
        changed = True
        while changed:
            changed = False
            for prefix in ('module.', '_orig_mod.'):
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = v
    return out


# -- loading --------------------------------------------------------------------------------------

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


def load_pretrained(
        model: nn.Module,
        pretrained_cfg: Optional[Dict[str, Any]] = None,
        filter_fn: Optional[Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]] = None,
        cache_dir: Optional[PathLike] = None,
) -> nn.Module:
    """Load the weights a pretrained cfg names into ``model`` (see the module docstring for the steps)."""
    cfg = dict(pretrained_cfg if pretrained_cfg is not None else getattr(model, 'pretrained_cfg', {}) or {})
    if cfg.get('state_dict') is not None:
        state_dict, what = cfg['state_dict'], 'state_dict'
    else:
        path = resolve_weights_file(cfg, cache_dir=cache_dir)
        state_dict, what = read_checkpoint(path), str(path)
    state_dict = unwrap_state_dict(state_dict)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    allow_missing: Tuple[str, ...] = ()
    classifier = cfg.get('classifier')
    if classifier and getattr(model, 'num_classes', None) != cfg.get('num_classes', getattr(model, 'num_classes', None)):
        # a new head: drop the checkpoint's classifier and keep the model's fresh one
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(classifier + '.')}
        allow_missing = (classifier + '.',)
    load_state_dict_strict(model, state_dict, what=what, allow_missing=allow_missing)
    return model


# -- publishing -----------------------------------------------------------------------------------

def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f'not JSON serialisable: {o!r}')


def _clean_cfg(cfg: Dict[str, Any]) -> Dict[str, Any]:
    drop = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source', 'tag', 'architecture')
    return {k: v for k, v in cfg.items() if k not in drop and v is not None}


def _model_card(name: str, cfg: Dict[str, Any], card: Dict[str, Any], sha: str) -> str:
    lic = cfg.get('license') or card.get('license') or 'other'
    lines = [
        '---', 'library_name: timm', f'license: {lic}', 'tags:', '- image-feature-extraction', '- timm',
        '- ldae-models', '---', '', f'# {name}', '',
        card.get('description') or cfg.get('description') or 'A denoising-based self-supervised encoder.', '',
        '## Use', '', '```python',
        *(['import ldae_models  # registers the architecture'] if card.get('needs_ldae_models', True) else []),
        'import timm', f"model = timm.create_model('hf-hub:ORG/{name}', pretrained=True)", '```', '',
        '## Details', '',
        f'- architecture: `{card.get("architecture", name)}`',
        f'- license: {lic}',
        f'- paper: {cfg.get("paper_name", "")} ({cfg.get("paper_ids", "")})',
        f'- input: {cfg.get("input_size")}, mean {cfg.get("mean")}, std {cfg.get("std")}, crop_pct {cfg.get("crop_pct")}',
        f'- model.safetensors sha256: `{sha}`',
    ]
    for title, key in (('Training', 'training'), ('Measured', 'results')):
        value = card.get(key)
        if value:
            lines += ['', f'## {title}', '']
            if isinstance(value, dict):
                lines += [f'- {k}: {v}' for k, v in value.items()]
            else:
                lines.append(str(value))
    return '\n'.join(lines) + '\n'


def save_pretrained(
        model: nn.Module,
        save_dir: PathLike,
        architecture: Optional[str] = None,
        model_args: Optional[Dict[str, Any]] = None,
        model_card: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and a model card ``README.md`` into ``save_dir``.

    The folder loads back with ``timm.create_model('local-dir:DIR')`` (or ``hf-hub:ORG/NAME`` once pushed).

    Args:
        model: An ldae_models model built by ``timm.create_model`` (its pretrained cfg names the
            architecture), or any timm model with ``architecture`` given.
        architecture: Registered timm architecture name (default: from the model's pretrained cfg).
        model_args: Constructor keyword arguments to record (default: those the model was created with).
        model_card: Optional dict: ``description``, ``license``, ``training`` (dict or text), ``results``.
    """
    from safetensors.torch import save_file
    if architecture is None and getattr(model, 'merged_t', None) is not None:
        return export_timm(model, save_dir, model_card=model_card)  # a merged encoder is a plain timm ViT
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    architecture = architecture or cfg.get('architecture')
    if not architecture:
        raise ValueError('save_pretrained needs the architecture name: pass architecture=...')
    args = dict(getattr(model, '_model_args', {}) if model_args is None else model_args)
    args = {k: v for k, v in args.items() if k not in _NOT_MODEL_ARGS}
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = save_dir / SAFETENSORS_NAME
    save_file(state, str(weights), metadata={'format': 'pt', 'architecture': architecture})
    sha = sha256_of(weights)
    pcfg = _clean_cfg(cfg)
    # the notes travel into config.json: the sha256 there is that of the file written here
    pcfg['notes'] = tuple(n for n in (pcfg.get('notes') or ()) if not str(n).startswith('sha256:')) + (sha256_note(sha),)
    config = dict(architecture=architecture, num_classes=getattr(model, 'num_classes', cfg.get('num_classes', 0)),
                  num_features=getattr(model, 'num_features', None), pretrained_cfg=pcfg, model_args=args)
    (save_dir / 'config.json').write_text(json.dumps(config, indent=2, default=_json_default) + '\n')
    card = dict(model_card or {}, architecture=architecture)
    (save_dir / 'README.md').write_text(_model_card(save_dir.name, pcfg, card, sha))
    return save_dir


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: str = 'Add model',
        **save_kwargs: Any,
) -> str:
    """``save_pretrained`` into a temporary folder and upload it to the Hugging Face repo ``repo_id``.

    Returns the URL of the commit. Needs network access and a token with write access.
    """
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / repo_id.split('/')[-1], **save_kwargs)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, 'commit_url', info))


# -- export to plain timm -------------------------------------------------------------------------

_TIMM_VIT_BY_WIDTH = {192: 'vit_tiny_patch16_224', 384: 'vit_small_patch16_224', 768: 'vit_base_patch16_224',
                      1024: 'vit_large_patch16_224', 1152: 'vit_so400m_patch14_siglip_224',
                      1280: 'vit_huge_patch14_224'}


def export_timm(merged: nn.Module, save_dir: PathLike, model_card: Optional[Dict[str, Any]] = None,
                source: Optional[str] = None) -> Path:
    """Save a merged encoder (a timm ``VisionTransformer``) as a plain timm checkpoint folder.

    ``config.json`` names one of timm's own ViT architectures and the model args that reproduce the
    merged network, so ``timm.create_model('local-dir:DIR', pretrained=True)`` (or ``hf-hub:``) builds it
    in a process that never imports ``ldae_models``.
    """
    from timm.models import VisionTransformer
    if not isinstance(merged, VisionTransformer) or not hasattr(merged, 'merged_t'):
        raise TypeError('export_timm needs a merged encoder: timm.create_model(name, merged=True) or enc.merge(t)')
    arch = _TIMM_VIT_BY_WIDTH.get(merged.embed_dim, 'vit_base_patch16_224')
    args = merged_vit_args(merged)
    cfg = dict(merged.pretrained_cfg or {})
    notes = tuple(n for n in (cfg.get('notes') or ()) if not str(n).startswith('sha256:'))
    cfg['notes'] = notes + (f'merged l-DAE encoder at t={merged.merged_t}' + (f' from {source}' if source else ''),)
    merged.pretrained_cfg = cfg
    card = dict(model_card or {})
    card.setdefault('description', f'l-DAE encoder merged at the fixed timestep t={merged.merged_t} into a plain '
                                   f'timm VisionTransformer; it loads with timm alone.')
    card['needs_ldae_models'] = False
    return save_pretrained(merged, save_dir, architecture=arch, model_args=args, model_card=card)


def merged_vit_args(vit: nn.Module) -> Dict[str, Any]:
    """The VisionTransformer kwargs recorded by ``merge`` (see ``AdaLNViT.vit_args``)."""
    args = getattr(vit, 'vit_args', None)
    if args is None:
        raise TypeError('not a merged encoder: it has no recorded vit_args')
    return dict(args, num_classes=vit.num_classes)
