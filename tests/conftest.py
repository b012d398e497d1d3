"""Shared helpers: tiny configs, randomised weights, an error measure, a fake Hugging Face cache."""
import os
import shutil
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # the suite never reaches the network

import pytest
import torch

# A tiny l-DAE: 16x16 images, 4x4 patches (D = 48), width 32, 2 + 2 blocks, d = 6.
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, latent_dim=6)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error: max |a - b| / max |b| (the measure every tolerance in the suite refers to)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter, the zero-initialised adaLN and final layers included, random values."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def smooth_images(n: int, size: int = 16, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """Synthetic images in [-1, 1] with spatial structure (random low-frequency patterns)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode='bicubic', align_corners=False)
    return torch.tanh(x + 0.1 * torch.randn(n, channels, size, size, generator=g))


@pytest.fixture
def tiny_dae():
    import ldae_models
    torch.manual_seed(0)
    dae = ldae_models.LatentDAE(**TINY)
    dae.fit_tokenizer([smooth_images(8, seed=s) for s in range(4)])
    return randomize_(dae).eval()


def fake_hf_cache(root: Path, repo_id: str, files: dict, commit: str = 'a' * 40) -> Path:
    """Lay out ``root`` as a Hugging Face hub cache holding ``files`` ({name: source path}) for ``repo_id``."""
    repo = Path(root) / ('models--' + repo_id.replace('/', '--'))
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / 'main').write_text(commit)
    snap = repo / 'snapshots' / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return snap
