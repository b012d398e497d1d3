"""The streaming path: the batched decoder against Pillow, one file descriptor per batch, the caller's stream drained
before a device decode, no non-blocking copy read on the host, /dev/shm checked, an unreadable image that ends the run
at once (no worker left), host memory flat in the data set's size for extract and probe, and MAE's probe under
torchrun on streamed images."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port
from ldae_models.data import ImageData, decode_batch, decode_pil, load_split, open_split, stream

REPO = Path(__file__).resolve().parents[1]
SMALL = json.dumps(dict(img_size=96, patch_size=16, depth=1, embed_dim=32, num_heads=2))


def photo_like(rng, h, w):
    """A smooth gradient with grain: JPEG-compressible like a photo, not like noise."""
    x = np.linspace(0, 1, w)[None, :, None] * rng.uniform(50, 200, (1, 1, 3))
    y = np.linspace(0, 1, h)[:, None, None] * rng.uniform(0, 55, (1, 1, 3))
    return (x + y + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)


def jpeg_bytes(a, quality=90):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format='JPEG', quality=quality)
    return b.getvalue()


def make_folder(root, n_train, n_test=20, h=120, w=160, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('test', n_test)):
        for i in range(n):
            d = root / split / f'c{i % classes}'
            d.mkdir(parents=True, exist_ok=True)
            (d / f'{i:05d}.jpg').write_bytes(jpeg_bytes(photo_like(rng, h, w)))
    return root


def test_batched_decode_equals_pillow_within_jpeg_tolerance():
    rng = np.random.default_rng(0)
    items = [jpeg_bytes(photo_like(rng, 375, 500)) for _ in range(6)]
    for size in (256, 64):
        batched = decode_batch(items, size).int()
        pil = torch.stack([decode_pil(x, size, draft=False) for x in items]).int()
        assert batched.shape == (6, 3, size, size) and batched.dtype == torch.int32
        assert (batched - pil).abs().max() <= 2  # one libjpeg-turbo in both here; other builds' IDCTs differ by 1-2
    drafted = torch.stack([decode_pil(x, 64) for x in items]).int()  # DCT-domain reduction: 1/4 scale, then resize
    assert (drafted - batched).abs().float().mean() < 3
    # a PNG and a decoded array go the other ways, into the same batch
    png = io.BytesIO()
    Image.fromarray(photo_like(rng, 80, 64)).save(png, format='PNG')
    mixed = decode_batch([items[0], png.getvalue(), torch.zeros(3, 64, 64, dtype=torch.uint8)], 64)
    assert mixed.shape == (3, 3, 64, 64) and torch.equal(mixed[0], batched[0].to(torch.uint8))
    with pytest.raises(ValueError, match='broken.jpg: cannot decode'):
        decode_batch([items[0], items[1][:len(items[1]) // 3]], 64, names=['good.jpg', 'broken.jpg'])


def test_streamed_split_gives_the_in_memory_images(tmp_path):
    root = make_folder(tmp_path / 'f', 12, 4)
    split = open_split('folder', root, 'train')
    whole = load_split('folder', root, 'train', 32, progress=False)
    got = list(stream(split, [[3, 1, 4], [0, 5]], 32, 'cpu', workers=1, count=2))
    assert torch.equal(got[0][0], whole.images[[3, 1, 4]]) and torch.equal(got[1][1], whole.labels[[0, 5]])
    assert torch.equal(list(stream(split, [[3, 1, 4]], 32, 'cpu', workers=0))[0][0], got[0][0])


_PEAK = """
import resource, sys
from ldae_models.cli import main
code = main(sys.argv[1:])
print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def peak_kb(args):
    r = subprocess.run([sys.executable, '-c', _PEAK] + args, capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split('PEAK_KB')[-1].split()[0])


def test_extract_and_probe_host_memory_is_flat_in_the_number_of_images(tmp_path):
    """2,000 images of 96 px are 55 MB decoded (x2.6 while decoding, as before streaming); streamed, the peak of 2,000
    is within 25% of the peak of 200."""
    root = make_folder(tmp_path / 'f', 2000, 20, h=96, w=128)
    common = ['--model', 'ldae_vit_tiny_patch4_32', '--model-args', SMALL, '--dataset', 'folder', '--data-root',
              str(root), '--workers', '0', '--batch-size-features', '50']
    peaks = {}
    for n in (200, 2000):
        peaks['extract', n] = peak_kb(['extract'] + common + ['--max-train', str(n), '--splits', 'train',
                                                              '--out', str(tmp_path / f'x{n}')])
        peaks['probe', n] = peak_kb(['probe'] + common + ['--max-train', str(n), '--floors'])
    for cmd in ('extract', 'probe'):
        small, big = peaks[cmd, 200], peaks[cmd, 2000]
        assert abs(big - small) < 0.25 * small, (cmd, small, big)
    index = json.loads((tmp_path / 'x2000/train/index.json').read_text())
    assert index['num_samples'] == 2000 and len(index['shards']) == 1


def test_mae_probe_under_torchrun_on_streamed_images(tmp_path):
    root = make_folder(tmp_path / 'f', 64, 16, h=48, w=64)
    args = ['linprobe', '--model', 'ldae_vit_tiny_patch4_32', '--model-args',
            json.dumps(dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)), '--dataset', 'folder',
            '--data-root', str(root), '--workers', '1', '--epochs', '2', '--warmup-epochs', '1', '--batch-size', '32',
            '--micro-batch', '8', '--device', 'cpu', '--in-memory', 'no', '--quiet', '--out', str(tmp_path / 'lp')]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr',
                        '127.0.0.1', '--master_port', str(free_port()), '-m', 'ldae_models'] + args,
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / 'lp' / 'result.json').read_text())
    assert res['processes'] == 2 and res['steps'] == 4 and res['n_test'] == 16 and 0 <= res['top1'] <= 100


# -- the GPU path's hazards, closed (each on the CPU) -----------------------------------------------------------------

_FDS = """
import resource, sys, os, torch
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
from ldae_models.data import open_split, sequential, stream
split = open_split('npz', sys.argv[1], 'train')
batch = int(sys.argv[2])
held = []
for images, labels in stream(split, list(sequential(len(split), batch)), 16, 'cpu', workers=2, decode_on='device'):
    held.append(images)  # the batches stay alive, as prefetched batches do
print('OK', len(held), len(os.listdir('/proc/self/fd')))
"""


@pytest.mark.parametrize('batch', [256, 1024])
def test_a_batch_of_bytes_costs_one_file_descriptor(tmp_path, batch):
    """Workers send a batch's bytes as one tensor (``Packed``), not one tensor per image: 4 batches of 1,024 JPEGs
    under ``ulimit -n 1024`` with 2 workers (the GPU path: decoded in the main process)."""
    rng = np.random.default_rng(0)
    n = 4 * batch
    blobs = [jpeg_bytes(photo_like(rng, 16, 16)) for _ in range(64)] * (n // 64)
    npz = tmp_path / 'b.npz'
    np.savez(npz, train_jpeg=np.frombuffer(b''.join(blobs), np.uint8),
             train_offsets=np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64),
             y_train=np.zeros(n, np.int64))
    r = subprocess.run([sys.executable, '-c', _FDS, str(npz), str(batch)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith('OK 4'), r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) < 200


def test_the_callers_stream_is_drained_before_every_device_decode(monkeypatch):
    """nvJPEG writes into blocks the caching allocator handed out on the caller's stream without waiting for the work
    queued there: the decoder synchronises that stream first (a stub of the stream and of the decoder)."""
    import ldae_models.data.decode as dec
    events = []

    class Stream:
        def synchronize(self):
            events.append('drain')
    monkeypatch.setattr(torch.cuda, 'current_stream', lambda device=None: Stream())

    def fake_decode(data, device=None, mode=None):
        events.append('decode')
        return [torch.zeros(3, 8, 8, dtype=torch.uint8) for _ in data] if isinstance(data, list) else \
            torch.zeros(3, 8, 8, dtype=torch.uint8)
    monkeypatch.setattr(dec, '_torchvision_decoder', lambda: (fake_decode, None))
    monkeypatch.setattr(torch.Tensor, 'to', lambda self, *a, **k: self)  # no CUDA here: stay on the host
    rng = np.random.default_rng(0)
    items = [jpeg_bytes(photo_like(rng, 8, 8)) for _ in range(3)]
    out = dec.decode_batch(items, 8, torch.device('cuda', 0))
    assert out.shape == (3, 3, 8, 8) and events == ['drain', 'decode']
    events.clear()
    dec.decode_batch(items, 8, 'cpu')
    assert events == ['decode']  # nothing to drain on a CPU


def test_no_non_blocking_copy_is_read_on_the_host(folder, tmp_path, monkeypatch):
    """A non-blocking copy to the host may be read before it lands: every copy the data path, extraction, the floors
    and the probe make to the CPU blocks (non-blocking only toward a GPU, from pinned memory)."""
    from ldae_models.cli import main
    seen = []
    real = torch.Tensor.to

    def spy(self, *a, **k):
        target = next((x for x in a if isinstance(x, (str, torch.device))), k.get('device'))
        if k.get('non_blocking') and target is not None and torch.device(target).type == 'cpu':
            seen.append(''.join(__import__('traceback').format_stack(limit=4)))
        return real(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, 'to', spy)
    args = ['--model', 'ldae_vit_tiny_patch4_32', '--model-args', json.dumps(dict(img_size=16, depth=1)),
            '--data-root', str(folder)]
    assert main(['probe', *args, '--floors', '--workers', '0']) == 0
    assert main(['extract', *args, '--workers', '1', '--out', str(tmp_path / 'f')]) == 0
    data = load_split('folder', folder, 'train', 16, progress=False)
    list(__import__('ldae_models').data.read_batches(data, [[0, 1]], 16, 'cpu'))
    assert seen == [], seen[0]


def test_a_shared_in_memory_copy_checks_the_free_space_of_dev_shm(tmp_path, monkeypatch):
    """A container's /dev/shm holds 64 MB by default; the decoded set of CIFAR-10 takes 150 MB: the run streams,
    and its data line says why."""
    import ldae_models.data.loader as L
    root = make_folder(tmp_path / 'f', 12, 4, h=32, w=32)
    split = open_split('folder', root, 'train')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    monkeypatch.setattr(L, 'shm_free_bytes', lambda: 64 * 2 ** 20)
    monkeypatch.setattr(L, 'SHM', str(tmp_path))  # a folder that exists, standing for /dev/shm
    monkeypatch.setattr(split, 'nbytes', lambda size: 150 * 2 ** 20)
    data, why = L.training_data(split, 32, 'auto', torch.device('cpu'))
    assert data is split and 'free space of' in why and '(64 MiB)' in why and '--shm-size' in why
    monkeypatch.setattr(L, 'shm_free_bytes', lambda: 1 << 40)
    monkeypatch.setattr(split, 'nbytes', lambda size: 12 * 3 * 32 * 32)
    data, why = L.training_data(split, 32, 'auto', torch.device('cpu'))
    assert isinstance(data, ImageData) and len(data) == 12 and why.startswith('in memory')
    assert list(tmp_path.glob('ldae-*')) == []  # the shared file is removed


def _children_with(marker):
    """Processes whose command line holds ``marker`` (a forked DataLoader worker keeps its parent's)."""
    out = []
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f'/proc/{pid}/cmdline').read_bytes():
                    out.append(int(pid))
            except OSError:
                pass
    return out


@pytest.mark.parametrize('command', ['extract', 'train'])
def test_an_unreadable_image_ends_the_run_at_once_and_leaves_no_process(tmp_path, command):
    """A file that is not an image, read by 2 workers: one line naming it, exit 2, within seconds, and no worker left
    behind (they ignore SIGTERM during training, so the loader stops them itself)."""
    import time
    root = make_folder(tmp_path / 'f', 60, 8, h=24, w=24)
    (root / 'train' / 'c1' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff not a jpeg at all' * 10)
    marker = f'marker-{os.getpid()}-{command}'
    out = tmp_path / marker
    extra = (['--model', 'ldae_vit_tiny_patch4_32', '--model-args', json.dumps(dict(img_size=16, depth=1))] +
             (['--batch-size', '8', '--in-memory', 'no', '--epochs', '1', '--pca-images', '16', '--quiet']
              if command == 'train' else []))
    t0 = time.time()
    r = subprocess.run([sys.executable, '-m', 'ldae_models', command, '--data-root', str(root), '--workers', '2',
                        '--out', str(out), *extra], capture_output=True, text=True, cwd=REPO, timeout=120)
    took = time.time() - t0
    assert r.returncode == 2 and took < 60, (r.returncode, took, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith('ldae-models')]
    assert len(errors) == 1 and errors[0].startswith(f'ldae-models {command}: error: ')
    assert 'corrupt.jpg: cannot decode the image' in errors[0] and 'Traceback' not in r.stderr
    time.sleep(1)
    assert _children_with(marker) == []


def test_check_data_lists_every_file_that_does_not_decode(tmp_path, capsys):
    from ldae_models.cli import main
    root = make_folder(tmp_path / 'f', 30, 6, h=24, w=24)
    (root / 'train' / 'c0' / 'bad1.jpg').write_bytes(b'nope')
    (root / 'test' / 'c1' / 'bad2.png').write_bytes(b'\x89PNG broken')
    listed = tmp_path / 'bad.txt'
    assert main(['check-data', '--data-root', str(root), '--workers', '2', '--out', str(listed)]) == 1
    out = capsys.readouterr()
    assert 'bad1.jpg: cannot decode' in out.out and 'bad2.png: cannot decode' in out.out
    assert '38 images checked: 2 cannot be decoded' in out.err
    assert sorted(Path(p).name for p in listed.read_text().split()) == ['bad1.jpg', 'bad2.png']
    (root / 'train' / 'c0' / 'bad1.jpg').unlink()
    (root / 'test' / 'c1' / 'bad2.png').unlink()
    assert main(['check-data', '--data-root', str(root), '--workers', '0']) == 0


def test_training_skips_unreadable_images_on_request(tmp_path):
    """--skip-bad-images: another image of its batch takes an unreadable one's place (the global batch keeps its
    size), named in the log and in OUT/skipped_images.txt."""
    from ldae_models.jobs import pretrain as T
    from conftest import tiny_config
    root = make_folder(tmp_path / 'f', 40, 8, h=16, w=16)
    (root / 'train' / 'c0' / 'zzz.jpg').write_bytes(b'nope')
    with pytest.raises(ValueError, match='zzz.jpg: cannot decode the image.*--skip-bad-images'):
        T.train(tiny_config(root, tmp_path / 'r', in_memory='no', max_steps=2))
    res = T.train(tiny_config(root, tmp_path / 'r', in_memory='no', skip_bad_images=True, epochs=1))
    assert res.step == 5 and 'zzz.jpg' in (tmp_path / 'r' / 'skipped_images.txt').read_text()
    res = T.train(tiny_config(root, tmp_path / 'm', in_memory='yes', skip_bad_images=True, epochs=1))
    assert res.step == 5 and 'zzz.jpg' in (tmp_path / 'm' / 'skipped_images.txt').read_text()
