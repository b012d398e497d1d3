"""Feature taps: pooled features at any layers and timesteps, for a batch or for a whole data set.

``extract_features(model, images, layers, ts)`` asks the encoder contract (``models.extractor``) of any zoo model or
timm model. ``dataset_features`` runs it over a decoded data set in batches on a device, one forward pass per t per
batch, with a progress bar; ``save_feature_shards`` / ``load_feature_shards`` keep the result as safetensors shards
(what ``ldae-models extract`` writes and ``ldae-models probe --features`` reads).
"""
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .data import ImageData, normalize
from .models.extractor import FeatureDict, LayerSpec, TimestepSpec, as_extractor  # noqa: F401

__all__ = ['extract_features', 'ddae_grid_features', 'dataset_features', 'feature_key', 'save_feature_shards',
           'load_feature_shards', 'read_feature_index', 'feature_cells', 'cached_features']


def extract_features(model: nn.Module, images: torch.Tensor, **kwargs: Any) -> FeatureDict:
    """``{(layer, t): (B, C)}``: ``FeatureExtractor.extract_features(images, layers=None, ts=None, noisy_input=None,
    generator=None, pool=True)`` of any zoo model (conditional or merged encoder, full DAE, DiT encoder with or without
    VAE, DDAE UNet) or of any timm model with ``forward_intermediates`` (which has no t: ``ts=None``)."""
    return as_extractor(model).extract_features(images, **kwargs)


def ddae_grid_features(model: nn.Module, images: torch.Tensor, out_ks: Sequence[int], ts: Sequence[float],
                       noisy_input: Optional[bool] = None, generator: Optional[torch.Generator] = None) -> FeatureDict:
    """DDAE's grid with DDAE's names: ``{(out_k, t): (B, C)}`` for 1-based decoder blocks ``out_k``."""
    feats = extract_features(model, images, layers=[k - 1 for k in out_ks], ts=ts, noisy_input=noisy_input,
                             generator=generator)
    return {(layer + 1, t): f for (layer, t), f in feats.items()}


def feature_key(layer: int, t: Optional[float]) -> str:
    """The name of a (layer, t) cell in files: ``layer11_t10`` (``t`` printed with %g; ``tnone`` without a t)."""
    return f'layer{layer}_t{"none" if t is None else format(t, "g")}'


@torch.no_grad()
def dataset_features(
        model: nn.Module,
        data: ImageData,
        layers: LayerSpec = None,
        ts: TimestepSpec = None,
        noisy_input: Optional[bool] = None,
        batch_size: int = 256,
        device: Union[str, torch.device] = 'cpu',
        seed: int = 0,
        progress: bool = True,
        desc: str = 'features',
) -> FeatureDict:
    """Pooled features of every image of ``data`` at (layers, ts): ``{(layer, t): (N, C)}`` float32 on the host.

    Images are normalised with the model's pretrained cfg (mean, std), batches run on ``device`` (under bf16 autocast
    on a GPU), the noise of ``noisy_input`` is seeded by ``seed``. ``data`` may already live on ``device``.
    """
    extractor = as_extractor(model)
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    mean, std = cfg.get('mean', (0.5,) * 3), cfg.get('std', (0.5,) * 3)
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    parts: Dict[Any, List[torch.Tensor]] = {}
    from tqdm.auto import tqdm
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else torch.autocast('cpu', enabled=False)
    with tqdm(total=len(data), desc=desc, unit='img', disable=None if progress else True, leave=False) as bar:
        for images, _ in data.batches(batch_size):
            x = normalize(images.to(device, non_blocking=True), mean, std)
            with amp:
                feats = extractor.extract_features(x, layers=layers, ts=ts, noisy_input=noisy_input, generator=gen)
            for k, v in feats.items():
                parts.setdefault(k, []).append(v.float().cpu())
            bar.update(len(images))
    return {k: torch.cat(v) for k, v in parts.items()}


def feature_cells(model: nn.Module, layers: LayerSpec, ts: TimestepSpec) -> List[Tuple[int, Optional[float]]]:
    """The (layer, t) cells that ``layers`` x ``ts`` name, checked against the model before any data is read: layers
    as 0-based block indices (``-1`` and the last block are one cell), ts as floats inside the model's range."""
    ext = as_extractor(model)
    idx = list(dict.fromkeys(ext.resolve_layers(layers)[1]))
    ts_list = list(dict.fromkeys(ext.resolve_ts(ts)))
    return [(layer, t) for layer in idx for t in ts_list]


def cached_features(folder: Optional[Union[str, Path]], meta: Dict[str, Any], cells: Sequence[Tuple[int, Any]],
                    extract: Callable[[List[int], List[Any]], Tuple[FeatureDict, torch.Tensor]],
                    log: Callable[[str], None] = print, shard_size: int = 50_000) -> Tuple[FeatureDict, torch.Tensor]:
    """One split's features at ``cells``: the cells ``folder`` holds are read, the others extracted (only those:
    ``extract(layers, ts)`` for the smallest grid that covers them) and added to ``folder`` beside the old ones.
    Nothing in the folder is deleted or overwritten; a folder of another setting is refused."""
    index = read_feature_index(folder) if folder else None
    have = set() if index is None else {(k['layer'], k['t']) for k in index['keys']}
    missing = [c for c in cells if c not in have]
    if index is not None:
        old_meta = {k: v for k, v in index.items() if k not in _INDEX_FIELDS}
        if not _same_meta(old_meta, meta):
            raise ValueError(f'{folder} holds features of another setting ({old_meta.get("model")}, '
                             f'{old_meta.get("checkpoint")}): use another --features folder')
    fresh: FeatureDict = {}
    labels = None
    if missing:
        if index is not None:
            log(f'{folder} lacks {len(missing)} of the {len(cells)} cells ({_cells_text(missing)}): extracting only '
                f'those')
        layers = sorted({c[0] for c in missing})
        ts = list(dict.fromkeys(c[1] for c in missing))
        got, labels = extract(layers, ts)
        fresh = {c: got[c] for c in missing}
        if folder:
            save_feature_shards(fresh, labels, folder, meta, shard_size=shard_size)
            log(f'features of {_cells_text(missing)} written to {folder}')
    old = [c for c in cells if c in have]
    if old:
        feats, labels, _ = load_feature_shards(folder, old)
        log(f'features of {_cells_text(old)} read from {folder}')
        fresh.update(feats)
    return {c: fresh[c] for c in cells}, labels


def _cells_text(cells: Sequence[Tuple[int, Any]]) -> str:
    text = ', '.join(f'block {layer} t {"-" if t is None else format(t, "g")}' for layer, t in cells[:4])
    return text + (f' and {len(cells) - 4} more' if len(cells) > 4 else '')


def _same_meta(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two feature folders describe the same setting (JSON round trip: tuples and lists compare equal)."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def save_feature_shards(features: FeatureDict, labels: torch.Tensor, out_dir: Union[str, Path],
                        meta: Dict[str, Any], shard_size: int = 50_000) -> Path:
    """Add features ``{(layer, t): (N, C)}`` to a feature folder: safetensors shards of ``shard_size`` rows (each
    with the labels) and ``index.json`` (the setting ``meta``, each cell with the shards that hold it).

    A folder that exists already keeps every cell it has: it must hold the same setting (``meta``) and the same
    images (labels), and only the cells it lacks are written, as new shard files beside the old ones; the index is
    replaced atomically once they are complete. A cell it has already is refused (``ValueError``), never overwritten.
    """
    from .hub.publish import save_safetensors, write_text_atomic
    out = Path(out_dir)
    labels = labels.cpu()
    n = len(labels)
    index_path = out / 'index.json'
    old: Optional[Dict[str, Any]] = None
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        old_meta = {k: v for k, v in old.items() if k not in _INDEX_FIELDS}
        if not _same_meta(old_meta, meta):
            diff = sorted(k for k in set(old_meta) | set(meta) if old_meta.get(k) != json.loads(json.dumps(meta.get(k))))
            raise ValueError(f'{out} holds features of another setting (differs in {", ".join(diff)}): use another '
                             f'folder')
        if old['num_samples'] != n or not torch.equal(_read_labels(out, old), labels):
            raise ValueError(f'{out} holds features of other images ({old["num_samples"]:,} labels, not these {n:,})')
        have = {(k['layer'], k['t']) for k in old['keys']}
        clash = [k for k in features if k in have]
        if clash:
            raise ValueError(f'{out} holds the cells {clash[:4]} already: a feature folder is never overwritten')
    out.mkdir(parents=True, exist_ok=True)
    names = {k: feature_key(*k) for k in features}
    part = 0 if old is None else 1 + max((k.get('part', 0) for k in old['keys']), default=0)
    count = max(1, -(-n // shard_size))
    files = []
    for s in range(count):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        name = (f'features-{s:05d}-of-{count:05d}.safetensors' if part == 0 else
                f'features-p{part}-{s:05d}-of-{count:05d}.safetensors')
        tensors = {names[k]: v[lo:hi].contiguous() for k, v in features.items()}
        tensors['labels'] = labels[lo:hi].contiguous()
        save_safetensors(tensors, out / name)
        files.append(name)
    keys = list(old['keys']) if old else []
    for k, v in features.items():
        keys.append(dict(layer=k[0], t=k[1], name=names[k], dim=v.shape[1], part=part, shards=files))
    index = dict(meta, num_samples=n, keys=keys, shards=old['shards'] if old else files)
    write_text_atomic(index_path, json.dumps(index, indent=2) + '\n')
    return out


_INDEX_FIELDS = ('num_samples', 'keys', 'shards')


def _read_labels(path: Path, index: Dict[str, Any]) -> torch.Tensor:
    from safetensors import safe_open
    parts = []
    for name in index['shards']:
        with safe_open(str(path / name), 'pt') as f:
            parts.append(f.get_tensor('labels'))
    return torch.cat(parts)


def read_feature_index(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The index of a feature folder, or None where there is none yet."""
    index_path = Path(path) / 'index.json'
    return json.loads(index_path.read_text()) if index_path.is_file() else None


def load_feature_shards(path: Union[str, Path], keys: Optional[Sequence[Tuple[int, Optional[float]]]] = None
                        ) -> Tuple[FeatureDict, torch.Tensor, Dict[str, Any]]:
    """Read what ``save_feature_shards`` wrote: (features, labels, index); ``keys`` picks (layer, t) cells."""
    from safetensors import safe_open
    path = Path(path)
    index = read_feature_index(path)
    if index is None:
        raise FileNotFoundError(f'{path} is not a feature folder (no index.json): make one with ldae-models extract')
    entries = {(k['layer'], k['t']): k for k in index['keys']}
    if keys is not None:
        lacking = [k for k in keys if k not in entries]
        if lacking:
            raise KeyError(f'{path} lacks the cells {lacking[:4]}')
        entries = {k: entries[k] for k in keys}
    feats: FeatureDict = {}
    for key, e in entries.items():
        parts = []
        for name in e.get('shards', index['shards']):
            with safe_open(str(path / name), 'pt') as f:
                parts.append(f.get_tensor(e['name']))
        feats[key] = torch.cat(parts)
    return feats, _read_labels(path, index), index
