"""What only a GPU can show, skipped without CUDA (not measured on a GPU yet): the streamed GPU path (nvJPEG decode,
resize on the device) against the in-memory path's CPU decode, in pixels (a few levels) and in trained weights (the
two paths closer to each other than to a run with another seed); no host sync in a GPU training step; and a run's
first steps logging the planned memory beside the measured peak."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def jpeg_folder(root, n=24):
    """Two classes of 160 x 120 JPEGs (gradients with noise): what nvJPEG decodes on the streamed GPU path."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / 'train' / f'c{i % 2}'
        d.mkdir(parents=True, exist_ok=True)
        x = np.linspace(0, 255, 160)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3)) + rng.normal(0, 10, (120, 160, 3))
        b = io.BytesIO()
        Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(b, format='JPEG', quality=90)
        (d / f'{i}.jpg').write_bytes(b.getvalue())
    return root


def test_the_gpu_decode_gives_the_cpu_decodes_images_within_a_few_levels(tmp_path):
    from ldae_models.data import decode_split, open_split, read_batches, sequential
    root = jpeg_folder(tmp_path / 'f')
    split = open_split('folder', root, 'train')
    cpu = decode_split(split, 64)
    gpu = torch.cat([x.cpu() for x, _ in read_batches(split, list(sequential(len(split), 8)), 64, 'cuda', workers=1)])
    diff = (gpu.int() - cpu.images.int()).abs().float()
    assert diff.mean() < 2 and diff.max() <= 24, (diff.mean().item(), diff.max().item())


def test_the_first_steps_log_planned_and_measured_memory(folder, tmp_path):
    from ldae_models.jobs.pretrain import TrainConfig, train
    out = tmp_path / 'run'
    train(TrainConfig(data_root=str(folder), out=str(out), batch_size=8, max_steps=12, workers=0, quiet=True,
                      pca_images=40, model_args=dict(img_size=16, depth=2, embed_dim=32, num_heads=2, latent_dim=6)))
    memory = [json.loads(x) for x in (out / 'log.jsonl').read_text().splitlines() if '"memory"' in x]
    assert [m['step'] for m in memory] == [1, 10] and all(m['measured_peak_gb'] > 0 for m in memory)


def test_streamed_and_in_memory_gpu_runs_train_alike(tmp_path):
    """Same images, order and draws; pixels within the decoders' tolerance: every step's loss within 5% of the
    in-memory run's (images decoded wrongly, or read before the decode ended, move it far more), and the streamed
    run's weights nearer the in-memory run's than a run with another seed is (equality holds on a CPU only)."""
    from conftest import tiny_config
    from safetensors.torch import load_file
    from ldae_models.jobs.pretrain import train
    root = jpeg_folder(tmp_path / 'f', n=40)
    runs = dict(mem=dict(in_memory='yes'), stream=dict(in_memory='no', workers=1), seed=dict(in_memory='yes', seed=1))
    weights = {}
    for name, kw in runs.items():
        train(tiny_config(root, tmp_path / name, max_steps=10, device='cuda', lr=1e-3, model_args=dict(
            img_size=32, depth=2, embed_dim=32, num_heads=2, latent_dim=6, patch_size=4), **kw))
        weights[name] = torch.cat([v.float().flatten() for k, v in sorted(load_file(
            str(tmp_path / name / 'model.safetensors')).items())])
    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / name / 'log.jsonl').read_text().splitlines()]
        return torch.tensor([r['loss'] for r in rows if 'loss' in r and 'step' in r])
    assert torch.allclose(losses('stream'), losses('mem'), rtol=0.05), (losses('stream'), losses('mem'))
    paths = (weights['stream'] - weights['mem']).norm()
    seeds = (weights['seed'] - weights['mem']).norm()
    assert paths < 0.5 * seeds, (paths.item(), seeds.item())


def test_a_gpu_training_step_never_waits_for_the_host(folder, tmp_path, monkeypatch):
    from conftest import count_step_syncs, tiny_config
    from ldae_models.jobs.pretrain import train
    counts = count_step_syncs(monkeypatch, lambda: train(tiny_config(
        folder, tmp_path / 'r', max_steps=6, log_every=100, ckpt_every=100, nan_check_every=100, device='cuda',
        in_memory='no', workers=1)))
    steps = {s: counts.get(s, []) for s in range(1, 5)}  # step 5 is the last: a log, check and checkpoint step
    assert steps == {s: [] for s in range(1, 5)}, steps
