"""Feature taps: pooled features at any layers and timesteps, for a batch or for a whole data set.

``extract_features(model, images, layers, ts)`` asks the encoder contract (``models.extractor``) of any zoo model or
timm model. ``dataset_features`` runs it over a data set in batches on a device, one forward pass per t per batch,
with its progress; the data set is decoded in memory (``ImageData``) or streamed (a ``data.Split``: host memory flat
in its size). ``FeatureWriter`` writes the features as safetensors shards while they are extracted (what
``ldae-models extract`` writes and ``ldae-models probe --features`` reads); ``cached_features`` reads the cells a
folder holds and extracts only the others; ``split_features`` is one split's features by way of a folder.
"""
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .data import ImageData, Split, normalize, read_batches, sequential
from .models.extractor import FeatureDict, LayerSpec, TimestepSpec, as_extractor  # noqa: F401
from .progress import Progress

__all__ = ['extract_features', 'dataset_features', 'feature_key', 'FeatureWriter', 'save_feature_shards',
           'load_feature_shards', 'read_feature_index', 'feature_cells', 'cached_features', 'split_features',
           'setting_difference', 'SETTING_FLAGS']

GridKey = Tuple[int, Optional[float]]  # a (layer, t) cell
Sink = Callable[[FeatureDict, torch.Tensor], None]  # told each batch's features and labels, in order


def extract_features(model: nn.Module, images: torch.Tensor, **kwargs: Any) -> FeatureDict:
    """``{(layer, t): (B, C)}``: ``FeatureExtractor.extract_features(images, layers=None, ts=None, noisy_input=None,
    generator=None, pool=True)`` of any zoo model (conditional or merged encoder, full DAE, DiT encoder with or without
    VAE, DDAE UNet) or of any timm model with ``forward_intermediates`` (which has no t: ``ts=None``)."""
    return as_extractor(model).extract_features(images, **kwargs)


def feature_key(layer: int, t: Optional[float]) -> str:
    """The name of a (layer, t) cell in files: ``layer11_t10`` (``t`` printed with %g; ``tnone`` without a t)."""
    return f'layer{layer}_t{"none" if t is None else format(t, "g")}'


@torch.no_grad()
def dataset_features(
        model: nn.Module,
        data: Union[ImageData, Split],
        layers: LayerSpec = None,
        ts: TimestepSpec = None,
        noisy_input: Optional[bool] = None,
        batch_size: int = 256,
        device: Union[str, torch.device] = 'cpu',
        seed: int = 0,
        progress: bool = True,
        desc: str = 'features',
        sink: Optional[Sink] = None,
        keep: bool = True,
        workers: int = -1,
        fn: Optional[Callable[[torch.Tensor], FeatureDict]] = None,
        bad: str = 'raise',
        on_bad: Optional[Callable[[List[str]], None]] = None,
) -> FeatureDict:
    """Pooled features of every image of ``data`` at (layers, ts): ``{(layer, t): (N, C)}`` float32 on the host.

    ``data`` is decoded (``ImageData``, possibly on ``device`` already) or a ``data.Split``, streamed in order and
    cropped to the model's input size. Images are normalised with the model's pretrained cfg (mean, std), batches run
    on ``device`` (under bf16 autocast on a GPU), the noise of ``noisy_input`` is seeded by ``seed``. Each batch's
    features go to ``sink`` (e.g. a ``FeatureWriter``) as they come; ``keep=False`` keeps none in memory (returns
    ``{}``). ``fn`` replaces the model's extractor (a function of the normalised batch, e.g. raw pixels).
    ``bad='drop'`` leaves unreadable images out (their labels with them; ``on_bad`` is told their names).
    """
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    mean, std = cfg.get('mean', (0.5,) * 3), cfg.get('std', (0.5,) * 3)
    size = int(cfg['input_size'][-1]) if 'input_size' in cfg else None
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    if fn is None:
        extractor = as_extractor(model)
        fn = lambda x: extractor.extract_features(x, layers=layers, ts=ts, noisy_input=noisy_input,  # noqa: E731
                                                  generator=gen)
    n = len(data)
    out: Dict[Any, torch.Tensor] = {}
    amp = torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else torch.autocast('cpu', enabled=False)
    count = -(-n // batch_size)
    lo = 0
    with Progress(n, desc, enabled=progress) as bar, contextlib.closing(read_batches(
            data, sequential(n, batch_size), size, device, workers, count, bad, on_bad)) as batches:
        for images, labels in batches:
            with amp:
                feats = {k: v.float().cpu() for k, v in fn(normalize(images, mean, std)).items()}
            if sink is not None:
                sink(feats, labels.cpu())
            if keep:
                for k, v in feats.items():
                    if k not in out:  # one preallocated tensor per cell
                        out[k] = torch.empty(n, *v.shape[1:], dtype=v.dtype)
                    out[k][lo:lo + len(v)] = v
            lo += len(images)
            bar.update(len(images))
    return {k: v[:lo] for k, v in out.items()}


def feature_cells(model: nn.Module, layers: LayerSpec, ts: TimestepSpec) -> List[Tuple[int, Optional[float]]]:
    """The (layer, t) cells that ``layers`` x ``ts`` name, checked against the model before any data is read: layers
    as 0-based block indices (``-1`` and the last block are one cell), ts as floats inside the model's range."""
    ext = as_extractor(model)
    idx = list(dict.fromkeys(ext.resolve_layers(layers)[1]))
    ts_list = list(dict.fromkeys(ext.resolve_ts(ts)))
    return [(layer, t) for layer in idx for t in ts_list]


def cached_features(folder: Optional[Union[str, Path]], meta: Dict[str, Any], cells: Sequence[Tuple[int, Any]],
                    extract: Callable[[List[int], List[Any], Optional[Sink], bool], Tuple[FeatureDict, torch.Tensor]],
                    log: Callable[[str], None] = print, shard_size: int = 50_000, keep: bool = True
                    ) -> Tuple[FeatureDict, Optional[torch.Tensor]]:
    """One split's features at ``cells``: the cells ``folder`` holds are read, the others extracted (only those:
    ``extract(layers, ts, sink, keep)`` for the smallest grid that covers them) and written to ``folder`` beside the
    old ones as they are extracted. Nothing in the folder is deleted or overwritten; a folder of another setting is
    refused. ``keep=False`` (``ldae-models extract``) holds no features in memory and returns ``({}, labels)``."""
    index = read_feature_index(folder) if folder else None
    have = set() if index is None else {(k['layer'], k['t']) for k in index['keys']}
    missing = [c for c in cells if c not in have]
    if index is not None:
        old_meta = {k: v for k, v in index.items() if k not in _INDEX_FIELDS}
        if not _same_meta(old_meta, meta):
            raise ValueError(f'{folder} holds features of another setting: {setting_difference(old_meta, meta)}; '
                             f'give the same flags, or another folder')
    fresh: FeatureDict = {}
    labels = None
    if missing:
        if index is not None:
            log(f'{folder} lacks {len(missing)} of the {len(cells)} cells ({_cells_text(missing)}): extracting only '
                f'those')
        layers = sorted({c[0] for c in missing})
        ts = list(dict.fromkeys(c[1] for c in missing))
        writer = FeatureWriter(folder, meta, missing, shard_size) if folder else None
        got, labels = extract(layers, ts, writer, keep)
        fresh = {c: got[c] for c in missing} if keep else {}
        if writer is not None:
            writer.close()
            log(f'features of {_cells_text(missing)} written to {folder}')
    old = [c for c in cells if c in have]
    if old and (keep or labels is None):
        feats, labels, _ = load_feature_shards(folder, old if keep else old[:1])
        log(f'features of {_cells_text(old)} read from {folder}')
        if keep:
            fresh.update(feats)
    return ({c: fresh[c] for c in cells} if keep else {}), labels


def _cells_text(cells: Sequence[Tuple[int, Any]]) -> str:
    text = ', '.join(f'block {layer} t {"-" if t is None else format(t, "g")}' for layer, t in cells[:4])
    return text + (f' and {len(cells) - 4} more' if len(cells) > 4 else '')


def _same_meta(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two feature folders describe the same setting (JSON round trip: tuples and lists compare equal)."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


# the flag that sets each field of a feature folder's setting (None: not a flag)
SETTING_FLAGS = {'model': '--model', 'checkpoint': '--checkpoint', 'model_args': '--model-args', 'full': '--full',
                 'noisy_input': '--noisy-input', 'seed': '--seed', 'dataset': '--dataset', 'max_train': '--max-train',
                 'max_test': '--max-test', 't_default': '--t', 'split': None}


def _shown(field: str, value: Any) -> str:
    if field in ('max_train', 'max_test') and not value:
        return 'all images'
    if isinstance(value, bool):
        return 'on' if value else 'off'
    return 'none' if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def setting_difference(stored: Dict[str, Any], given: Dict[str, Any]) -> str:
    """The fields in which two feature settings differ, each with its flag and both values, in words."""
    stored, given = json.loads(json.dumps(stored)), json.loads(json.dumps(given))
    parts = []
    for field in sorted(set(stored) | set(given), key=lambda f: list(SETTING_FLAGS).index(f) if f in SETTING_FLAGS
                        else 99):
        if stored.get(field) != given.get(field):
            name = SETTING_FLAGS.get(field) or field
            parts.append(f'{name} {_shown(field, stored.get(field))} there, {_shown(field, given.get(field))} now')
    return '; '.join(parts)


class FeatureWriter:
    """Add the features of ``cells`` to a feature folder while they are extracted: call it with each batch's
    ``{(layer, t): (B, C)}`` and labels, in order; every ``shard_size`` rows become a safetensors shard (with their
    labels); ``close()`` writes ``index.json`` (the setting ``meta``, each cell with its shards) atomically.

    A folder that exists already keeps every cell it has: it must hold the same setting and the same images (labels,
    checked shard by shard), and only the cells it lacks are written, as new shard files beside the old ones
    (``features-p1-...``); the index is replaced once they are complete, so an interrupted extraction leaves the old
    folder as it was. A cell it has already is refused (``ValueError``), never overwritten. Memory: one shard.
    """

    def __init__(self, out_dir: Union[str, Path], meta: Dict[str, Any], cells: Sequence[Tuple[int, Any]],
                 shard_size: int = 50_000) -> None:
        self.out, self.meta, self.cells, self.shard_size = Path(out_dir), meta, list(cells), shard_size
        self.old: Optional[Dict[str, Any]] = read_feature_index(self.out)
        self.old_labels = None
        if self.old is not None:
            old_meta = {k: v for k, v in self.old.items() if k not in _INDEX_FIELDS}
            if not _same_meta(old_meta, meta):
                raise ValueError(f'{self.out} holds features of another setting: '
                                 f'{setting_difference(old_meta, meta)}; give the same flags, or another folder')
            have = {(k['layer'], k['t']) for k in self.old['keys']}
            clash = [k for k in self.cells if k in have]
            if clash:
                raise ValueError(f'{self.out} holds the cells {clash[:4]} already: a feature folder is never '
                                 f'overwritten')
            self.old_labels = _read_labels(self.out, self.old)
        self.part = 0 if self.old is None else 1 + max((k.get('part', 0) for k in self.old['keys']), default=0)
        self.buf: Dict[Any, List[torch.Tensor]] = {c: [] for c in self.cells}
        self.buf_labels: List[torch.Tensor] = []
        self.rows, self.written, self.files, self.dims = 0, 0, [], {}

    def __call__(self, feats: FeatureDict, labels: torch.Tensor) -> None:
        for c in self.cells:
            self.buf[c].append(feats[c])
            self.dims[c] = feats[c].shape[1]
        self.buf_labels.append(labels.cpu())
        self.rows += len(labels)
        while self.rows >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        from .hub.publish import save_safetensors
        take = lambda parts: torch.cat(parts)  # noqa: E731
        labels = take(self.buf_labels)
        tensors = {feature_key(*c): take(self.buf[c])[:rows].contiguous() for c in self.cells}
        tensors['labels'] = labels[:rows].contiguous()
        if self.old_labels is not None:
            lo = self.written
            if lo + rows > len(self.old_labels) or not torch.equal(self.old_labels[lo:lo + rows], tensors['labels']):
                raise ValueError(f'{self.out} holds features of other images ({len(self.old_labels):,} labels, not '
                                 f'these)')
        s = len(self.files)
        name = (f'features-{s:05d}.safetensors' if self.part == 0 else f'features-p{self.part}-{s:05d}.safetensors')
        self.out.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, self.out / name)
        self.files.append(name)
        self.written += rows
        self.rows -= rows
        self.buf = {c: [take(self.buf[c])[rows:]] for c in self.cells}
        self.buf_labels = [labels[rows:]]

    def close(self) -> Path:
        from .hub.publish import write_text_atomic
        if self.rows or not self.files:
            self._flush(self.rows)
        n = self.written
        if self.old is not None and self.old['num_samples'] != n:
            raise ValueError(f'{self.out} holds features of other images ({self.old["num_samples"]:,} labels, not '
                             f'these {n:,})')
        keys = list(self.old['keys']) if self.old else []
        for c in self.cells:
            keys.append(dict(layer=c[0], t=c[1], name=feature_key(*c), dim=self.dims.get(c, 0), part=self.part,
                             shards=self.files))
        index = dict(self.meta, num_samples=n, keys=keys, shards=self.old['shards'] if self.old else self.files)
        write_text_atomic(self.out / 'index.json', json.dumps(index, indent=2) + '\n')
        return self.out


def save_feature_shards(features: FeatureDict, labels: torch.Tensor, out_dir: Union[str, Path],
                        meta: Dict[str, Any], shard_size: int = 50_000) -> Path:
    """Add features ``{(layer, t): (N, C)}`` held in memory to a feature folder (``FeatureWriter``'s rules)."""
    writer = FeatureWriter(out_dir, meta, list(features), shard_size)
    for lo in range(0, max(1, len(labels)), shard_size):
        writer({k: v[lo:lo + shard_size] for k, v in features.items()}, labels[lo:lo + shard_size])
    return writer.close()


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


def split_features(model: nn.Module, open_data: Callable[[], Union[ImageData, Split]], cells: List[GridKey],
                   folder: Optional[Union[str, Path]], meta: Dict[str, Any], noisy_input: Optional[bool] = None,
                   batch_size: int = 256, device: Union[str, torch.device] = 'cpu', seed: int = 0, workers: int = -1,
                   shard_size: int = 50_000, keep: bool = True, log: Callable[[str], None] = print,
                   progress: bool = True, desc: str = 'features', bad: str = 'raise',
                   on_bad: Optional[Callable[[List[str]], None]] = None
                   ) -> Tuple[FeatureDict, Optional[torch.Tensor], float]:
    """One split's features at ``cells`` by way of a feature ``folder`` (``cached_features``): (features, labels,
    seconds of extraction). ``open_data`` lists the split only when something must be extracted."""
    seconds = [0.0]

    def extract(layers: List[int], ts: List[Any], sink: Optional[Sink], keep: bool):
        data = open_data()
        log(f'extracting features of {len(data):,} images ({desc}) at blocks {layers}, t {ts} on {device}')
        t0 = time.time()
        labels: List[torch.Tensor] = []

        def tee(feats: FeatureDict, y: torch.Tensor) -> None:
            labels.append(y)
            if sink is not None:
                sink(feats, y)
        feats = dataset_features(model, data, layers=layers, ts=ts, noisy_input=noisy_input, batch_size=batch_size,
                                 device=device, seed=seed, desc=desc, sink=tee, keep=keep, workers=workers,
                                 progress=progress, bad=bad, on_bad=on_bad)
        seconds[0] = time.time() - t0
        return feats, torch.cat(labels) if labels else data.labels[:0]

    feats, labels = cached_features(folder, meta, cells, extract, log=log, shard_size=shard_size, keep=keep)
    return feats, labels, seconds[0]
