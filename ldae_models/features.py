"""Feature taps: pooled features at any layers and timesteps, for a batch or for a whole data set.

``extract_features(model, images, layers, ts)`` asks the encoder contract (``models.extractor``) of any zoo model or
timm model. ``dataset_features`` runs it over a decoded data set in batches on a device, one forward pass per t per
batch, with a progress bar; ``save_feature_shards`` / ``load_feature_shards`` keep the result as safetensors shards
(what ``ldae-models extract`` writes and ``ldae-models probe --features`` reads).
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .data import ImageData, normalize
from .models.extractor import FeatureDict, LayerSpec, TimestepSpec, as_extractor  # noqa: F401

__all__ = ['extract_features', 'ddae_grid_features', 'dataset_features', 'feature_key', 'save_feature_shards',
           'load_feature_shards']


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


def save_feature_shards(features: FeatureDict, labels: torch.Tensor, out_dir: Union[str, Path],
                        meta: Dict[str, Any], shard_size: int = 50_000) -> Path:
    """Write features ``{(layer, t): (N, C)}`` and labels as safetensors shards of ``shard_size`` rows plus
    ``index.json`` (the meta data, the keys and the shard files)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    names = {k: feature_key(*k) for k in features}
    files = []
    count = max(1, -(-n // shard_size))
    for s in range(count):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        name = f'features-{s:05d}-of-{count:05d}.safetensors'
        tensors = {names[k]: v[lo:hi].contiguous() for k, v in features.items()}
        tensors['labels'] = labels[lo:hi].cpu().contiguous()
        save_file(tensors, str(out / name), metadata={'format': 'pt'})
        files.append(name)
    index = dict(meta, num_samples=n, keys=[dict(layer=k[0], t=k[1], name=names[k], dim=v.shape[1])
                                            for k, v in features.items()], shards=files)
    (out / 'index.json').write_text(json.dumps(index, indent=2) + '\n')
    return out


def load_feature_shards(path: Union[str, Path]) -> Tuple[FeatureDict, torch.Tensor, Dict[str, Any]]:
    """Read what ``save_feature_shards`` wrote: (features, labels, index)."""
    from safetensors.torch import load_file
    path = Path(path)
    index_path = path / 'index.json'
    if not index_path.is_file():
        raise FileNotFoundError(f'{path} is not a feature folder (no index.json): make one with ldae-models extract')
    index = json.loads(index_path.read_text())
    parts = [load_file(str(path / name)) for name in index['shards']]
    feats = {(k['layer'], k['t']): torch.cat([p[k['name']] for p in parts]) for k in index['keys']}
    labels = torch.cat([p['labels'] for p in parts])
    return feats, labels, index
