"""Shared helpers: tiny configs, randomised weights, an error measure, a fake Hugging Face cache."""
import os
import shutil
import socket
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # the suite never reaches the network

import pytest
import torch
from PIL import Image

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


@pytest.fixture(scope='session')
def folder(tmp_path_factory):
    """Two colour classes of 16x16 images: train (20 each) and test (8 each)."""
    root = tmp_path_factory.mktemp('imgs')
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 20), ('test', 8)):
        for c in range(2):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(n):
                x = torch.rand(16, 16, 3, generator=g) * 90
                x[..., 0 if c == 0 else 2] += 150
                Image.fromarray(x.clamp(0, 255).byte().numpy()).save(d / f'{i}.png')
    return root


def free_port() -> int:
    """A free local TCP port for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


TINY_MODEL_ARGS = dict(img_size=16, embed_dim=32, depth=2, num_heads=2, latent_dim=6)


def tiny_config(folder, out, **fields):
    """The in-process tier's TrainConfig: the tiny l-DAE on the synthetic folder (40 images, 5 steps an epoch)."""
    from ldae_models.jobs.pretrain import TrainConfig
    base = dict(data_root=str(folder), out=str(out), model_args=dict(TINY_MODEL_ARGS), batch_size=8, epochs=2,
                warmup_epochs=1, workers=0, log_every=1, ckpt_every=2, ema=0.9, pca_images=40, quiet=True)
    return TrainConfig(**{**base, **fields})


class Killed(BaseException):
    """Raised in-process right after a chosen checkpoint: a run that dies there (what a SIGKILL leaves)."""


def kill_after_saves(monkeypatch, n: int) -> None:
    """Make the n-th checkpoint written be the run's last act (in-process: ``Killed`` right after it)."""
    import ldae_models.engine.checkpoint as C
    orig, count = C.save_checkpoint, [0]

    def save_then_die(path, state):
        orig(path, state)
        count[0] += 1
        if count[0] == n:
            raise Killed(f'after checkpoint {n}')
    monkeypatch.setattr(C, 'save_checkpoint', save_then_die)


def same_files(a, b, *names) -> None:
    """The safetensors files ``names`` of two run folders hold equal tensors (bit for bit)."""
    from safetensors.torch import load_file
    for name in names:
        x, y = load_file(str(Path(a) / name)), load_file(str(Path(b) / name))
        assert x.keys() == y.keys(), name
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k, (x[k].float() - y[k].float()).abs().max().item())


def count_step_syncs(monkeypatch, run):
    """``run()`` with the host syncs of each training step counted (``engine.HostSyncCounter``, labelled by the step;
    the optimizer's step counters, host tensors on a GPU too, left out); returns {step: [ops]}."""
    import ldae_models.engine.loop as L
    opts = []
    orig_build = L.build_optimizer

    def build(*a, **k):
        opts.append(orig_build(*a, **k))
        return opts[-1]
    monkeypatch.setattr(L, 'build_optimizer', build)
    from ldae_models.engine import HostSyncCounter
    counter = HostSyncCounter(ignore=lambda t: any(t is s.get('step') for o in opts for s in o.state.values()))
    orig_lr = L.lr_at

    def lr(step, *a, **k):  # the first call of a step: count from here
        counter.label = step
        return orig_lr(step, *a, **k)
    monkeypatch.setattr(L, 'lr_at', lr)
    with counter:
        run()
    return counter.counts


def killer_script(command: str) -> str:
    """``python -c`` source that runs ``ldae-models COMMAND ARGS`` and SIGKILLs itself right after the checkpoint
    number ``$KILL_AFTER_SAVES`` is written (a hard kill, to test exact resume)."""
    return f'''
import os, signal, sys
import ldae_models.engine.checkpoint as T
from ldae_models.cli import main
orig, n = T.save_checkpoint, [0]
def save_then_die(path, state):
    orig(path, state)
    n[0] += 1
    if n[0] == int(os.environ["KILL_AFTER_SAVES"]):
        os.kill(os.getpid(), signal.SIGKILL)
T.save_checkpoint = save_then_die
sys.exit(main([{command!r}] + sys.argv[1:]))
'''
