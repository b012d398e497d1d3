"""Publishing: a model as a folder timm loads (``local-dir:`` / ``hf-hub:``), the Hugging Face upload, and the
export of a merged encoder as a plain timm ViT that loads without ``ldae_models``.

A folder holds ``model.safetensors``, ``config.json`` (architecture, model args, pretrained cfg) and a model card
``README.md``. What ``config.json`` says of the weights is about the file written here: its sha256 and a description
of what it holds; nothing is copied from the tag the model came from except the data config (input size, mean, std)
and the license and papers.
"""
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .sources import SAFETENSORS_NAME, SHARDED_NAME, WEIGHTS_INFO_KEYS, PathLike, sha256_note, sha256_of

__all__ = ['save_pretrained', 'push_to_hub', 'export_timm', 'save_sharded', 'save_safetensors', 'write_text_atomic']

# Keys of the source cfg that stay true of the written file.
_KEPT_WEIGHT_INFO = ('license',)
# timm ViT architectures by width, for the config of an exported plain ViT (its model args override the size).
_TIMM_VIT_BY_WIDTH = {192: 'vit_tiny_patch16_224', 384: 'vit_small_patch16_224', 768: 'vit_base_patch16_224',
                      1024: 'vit_large_patch16_224', 1152: 'vit_so400m_patch14_siglip_224',
                      1280: 'vit_huge_patch14_224'}


FLOAT32_KEPT = ('*tokenizer.*', '*pos_embed')  # the PCA statistics and the sin-cos positions: exact in float32


def cast_floats(state: Dict[str, torch.Tensor], dtype: torch.dtype, keep: Sequence[str] = FLOAT32_KEPT
                ) -> Dict[str, torch.Tensor]:
    """The state dict with its floating-point tensors in ``dtype`` (float16, bfloat16 to ship smaller files), except
    those whose names match a pattern of ``keep`` (fnmatch): ``ldae-models convert --dtype`` and the campaign's
    collected weights."""
    from fnmatch import fnmatchcase
    return {k: v.to(dtype) if v.is_floating_point() and not any(fnmatchcase(k, p) for p in keep) else v
            for k, v in state.items()}


def save_safetensors(tensors: Dict[str, torch.Tensor], path: PathLike, metadata: Optional[Dict[str, str]] = None
                     ) -> Path:
    """Write tensors (moved to the CPU, made contiguous) as one safetensors file, atomically: a temporary name in the
    same folder, then a rename, so that the file appears only when complete. ``metadata`` values are strings."""
    from safetensors.torch import save_file
    import os
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={'format': 'pt', **(metadata or {})})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files: give the permissions of any new file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write a text file (an index, a config) under a temporary name, then rename it: it appears only when complete."""
    import os
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f'not JSON serialisable: {o!r}')


def _dtypes(state: Dict[str, torch.Tensor]) -> str:
    count = Counter(str(v.dtype).replace('torch.', '') for v in state.values())
    return ', '.join(f'{n} {d}' for d, n in count.most_common())


def _model_card(name: str, architecture: str, cfg: Dict[str, Any], card: Dict[str, Any], sha: str) -> str:
    lic = cfg.get('license') or card.get('license') or 'other'
    lines = [
        '---', 'library_name: timm', f'license: {lic}', 'tags:', '- image-feature-extraction', '- timm',
        '- ldae-models', '---', '', f'# {name}', '', cfg['description'], '',
        '## Use', '', '```python',
        *(['import ldae_models  # registers the architecture'] if card.get('needs_ldae_models', True) else []),
        'import timm', f"model = timm.create_model('hf-hub:ORG/{name}', pretrained=True)", '```', '',
        '## Details', '',
        f'- architecture: `{architecture}`',
        f'- license: {lic}',
        f'- paper: {cfg.get("paper_name", "")} ({cfg.get("paper_ids", "")})',
        f'- input: {cfg.get("input_size")}, mean {cfg.get("mean")}, std {cfg.get("std")}, crop_pct {cfg.get("crop_pct")}',
        f'- model.safetensors sha256: `{sha}`',
    ]
    for title, key in (('Training', 'training'), ('Measured', 'results')):
        value = card.get(key)
        if value:
            lines += ['', f'## {title}', '']
            lines += [f'- {k}: {v}' for k, v in value.items()] if isinstance(value, dict) else [str(value)]
    return '\n'.join(lines) + '\n'


def _write_folder(save_dir: PathLike, state: Dict[str, torch.Tensor], architecture: str, source_cfg: Dict[str, Any],
                  model_args: Dict[str, Any], num_classes: int, num_features: Optional[int], card: Dict[str, Any],
                  extra_notes: tuple = ()) -> Path:
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    weights = save_safetensors(state, save_dir / SAFETENSORS_NAME, metadata={'architecture': architecture})
    sha = sha256_of(weights)
    cfg = {k: v for k, v in source_cfg.items() if v is not None and
           (k not in WEIGHTS_INFO_KEYS or k in _KEPT_WEIGHT_INFO) and k != 'architecture'}
    what = card.get('description') or f'{architecture} weights saved by ldae_models.'
    cfg['description'] = f'{what} The file holds {len(state)} tensors ({_dtypes(state)}).'
    cfg['notes'] = tuple(extra_notes) + (sha256_note(sha),)
    config = dict(architecture=architecture, num_classes=num_classes, num_features=num_features, pretrained_cfg=cfg,
                  model_args=model_args)
    (save_dir / 'config.json').write_text(json.dumps(config, indent=2, default=_json_default) + '\n')
    (save_dir / 'README.md').write_text(_model_card(save_dir.name, architecture, cfg, card, sha))
    return save_dir


def save_pretrained(model: nn.Module, save_dir: PathLike, architecture: Optional[str] = None,
                    model_args: Optional[Dict[str, Any]] = None, model_card: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model.safetensors``, ``config.json`` and a model card ``README.md`` into ``save_dir``.

    The folder loads back with ``timm.create_model('local-dir:DIR', pretrained=True)`` (or ``hf-hub:ORG/NAME`` once
    pushed), as the same kind of model (conditional or merged) with the same arguments.

    Args:
        model: A model built by ``timm.create_model`` (its pretrained cfg names the architecture), or any timm model
            with ``architecture`` given.
        architecture: Registered timm architecture name (default: from the model's pretrained cfg).
        model_args: Constructor keyword arguments to record (default: those the model was created with).
        model_card: Optional dict: ``description``, ``license``, ``training`` (dict or text), ``results``.

    A merged encoder is written as what it is, a plain timm ViT (``export_timm``).
    """
    if architecture is None and isinstance(getattr(model, 'vit_args', None), dict):  # a MergedViT
        return export_timm(model, save_dir, model_card=model_card)
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    architecture = architecture or cfg.get('architecture')
    if not architecture:
        raise ValueError('save_pretrained needs the architecture name: pass architecture=...')
    args = dict(getattr(model, '_model_args', {}) if model_args is None else model_args)
    card = dict(model_card or {})
    return _write_folder(save_dir, model.state_dict(), architecture, cfg, args,
                         getattr(model, 'num_classes', cfg.get('num_classes', 0)), getattr(model, 'num_features', None),
                         card)


def export_timm(merged: nn.Module, save_dir: PathLike, model_card: Optional[Dict[str, Any]] = None,
                source: Optional[str] = None) -> Path:
    """Save a merged encoder as a plain timm checkpoint folder.

    ``config.json`` names one of timm's own ViT architectures and the model args that rebuild the merged network, so
    ``timm.create_model('local-dir:DIR', pretrained=True)`` (or ``hf-hub:``) builds it in a process that never
    imports ``ldae_models``.
    """
    from timm.models import VisionTransformer
    vit_args = getattr(merged, 'vit_args', None)
    if not isinstance(merged, VisionTransformer) or vit_args is None:
        raise TypeError('export_timm needs a merged encoder: timm.create_model(name) (merged by default) or '
                        'enc.merge(t)')
    card = dict(model_card or {})
    card.setdefault('description', f'l-DAE-style encoder merged at the fixed timestep t={merged.t:g} into a plain '
                                   f'timm VisionTransformer; it loads with timm alone.')
    card['needs_ldae_models'] = False
    note = f'merged at t={merged.t:g}' + (f' from {source}' if source else '')
    return _write_folder(save_dir, merged.state_dict(), _TIMM_VIT_BY_WIDTH.get(merged.embed_dim, 'vit_base_patch16_224'),
                         dict(merged.pretrained_cfg or {}), dict(vit_args, num_classes=merged.num_classes),
                         merged.num_classes, merged.num_features, card, extra_notes=(note,))


def push_to_hub(model: nn.Module, repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = 'Add model', **save_kwargs: Any) -> str:
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


def save_sharded(state: Dict[str, torch.Tensor], save_dir: PathLike, max_shard_bytes: int = 15 << 20,
                 metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a state dict as safetensors shards of at most ``max_shard_bytes`` (a tensor larger than that gets a
    shard of its own) and Hugging Face's index ``model.safetensors.index.json`` (``metadata`` in every shard and in the
    index), which ``read_checkpoint`` and every ``file=`` source read. Returns the index's path."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = v, size + nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f'model-{i:05d}-of-{len(shards):05d}.safetensors'
        save_safetensors(shard, save_dir / name, metadata=metadata)
        weight_map.update({k: name for k in shard})
    index = save_dir / SHARDED_NAME
    total = sum(v.numel() * v.element_size() for v in state.values())
    index.write_text(json.dumps(dict(metadata=dict(total_size=total, **(metadata or {})), weight_map=weight_map),
                                indent=2) + '\n')
    return index
