"""Data sets the way users have them (a fake of torchvision's CIFAR-10 files, an .npz, an ImageFolder) and the
device-side augmentation."""
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ldae_models import data as D
from ldae_models.data import splits as S


def fake_cifar10(root, n_per_batch=4, seed=0):
    """torchvision's layout: ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}, python pickles of numpy arrays
    (bytes keys, as the Python 2 originals), with the md5 table patched to these files."""
    rng = np.random.default_rng(seed)
    folder = root / S.CIFAR10_DIR
    folder.mkdir(parents=True)
    arrays = {}
    for name in [n for split in S.CIFAR10_FILES.values() for n, _ in split]:
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, n_per_batch).tolist())
        with open(folder / name, 'wb') as f:
            pickle.dump({b'batch_label': name.encode(), b'labels': y, b'data': x, b'filenames': [b'x.png'] * len(y)},
                        f, protocol=2)
        arrays[name] = (x, y)
    table = {split: [(n, S._md5(folder / n)) for n, _ in files] for split, files in S.CIFAR10_FILES.items()}
    return arrays, table


def test_torchvision_cifar10_layout(tmp_path, monkeypatch):
    arrays, table = fake_cifar10(tmp_path)
    monkeypatch.setattr(S, 'CIFAR10_FILES', table)
    train = D.load_split('cifar10', tmp_path, 'train')
    test = D.load_split('cifar10', tmp_path, 'test')
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8 and len(test) == 4
    x, y = arrays['data_batch_2']
    assert torch.equal(train.images[4:8], torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert train.labels[4:8].tolist() == y and train.classes[0] == 'airplane'
    assert D.load_split('cifar10', tmp_path, 'test', img_size=48).images.shape == (4, 3, 48, 48)


def test_cifar10_files_are_checked(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='pass --download'):
        D.load_split('cifar10', tmp_path / 'none', 'train')
    _, table = fake_cifar10(tmp_path)
    with pytest.raises(ValueError, match='md5 of the official CIFAR-10 release'):
        D.load_split('cifar10', tmp_path, 'train')  # the real md5s: these fake files are not the release
    # a file that would run code is refused by the unpickler, even with a matching md5
    evil = tmp_path / S.CIFAR10_DIR / 'test_batch'
    evil.write_bytes(pickle.dumps({b'data': np.zeros((1, 3072), np.uint8), b'labels': [0], b'x': print}))
    table['test'] = [('test_batch', S._md5(evil))]
    monkeypatch.setattr(S, 'CIFAR10_FILES', table)
    with pytest.raises(pickle.UnpicklingError, match='refusing builtins.print'):
        D.load_split('cifar10', tmp_path, 'test')


def test_npz_jpeg_and_array_layouts(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    bufs = []
    for im in imgs:
        b = io.BytesIO()
        Image.fromarray(im).save(b, format='PNG')  # lossless, so the decoded pixels are checkable
        bufs.append(np.frombuffer(b.getvalue(), np.uint8))
    off = np.cumsum([0] + [len(b) for b in bufs])
    np.savez(tmp_path / 'a.npz', train_jpeg=np.concatenate(bufs), train_offsets=off, y_train=np.arange(5),
             x_test=imgs[:2], y_test=np.array([1, 2]), classes=np.array(['a', 'b', 'c', 'd', 'e']))
    train = D.load_split('npz', tmp_path / 'a.npz', 'train')
    assert torch.equal(train.images, torch.from_numpy(imgs).permute(0, 3, 1, 2)) and train.classes[4] == 'e'
    test = D.load_split('npz', tmp_path / 'a.npz', 'test')
    assert test.labels.tolist() == [1, 2] and torch.equal(test.images, train.images[:2])
    with pytest.raises(ValueError, match='no y_val'):
        S._npz_split(tmp_path / 'a.npz', 'val')


def test_folder_and_subset(tmp_path):
    for c in ('cat', 'dog'):
        (tmp_path / 'train' / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / 'train' / c / f'{i}.jpg')
    data = D.load_split('folder', tmp_path, 'train', img_size=16)
    assert data.images.shape == (6, 3, 16, 16) and data.classes == ['cat', 'dog'] and data.labels.tolist() == [0] * 3 + [1] * 3
    sub = data.subset(4, seed=1)
    assert len(sub) == 4 and torch.equal(sub.images, data.subset(4, seed=1).images)
    with pytest.raises(FileNotFoundError, match='no test or val folder'):
        D.load_split('folder', tmp_path, 'test')


def test_augment_on_the_device():
    x = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(64, 3, 32, 32).contiguous()
    assert D.augment(x, 'center') is x
    g = torch.Generator().manual_seed(0)
    y = D.augment(x, 'rrc', g)
    assert y.shape == x.shape and y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5
    rows = y[:, 0, 16]
    flipped = (rows[:, -1] < rows[:, 0]).float().mean()  # a left-to-right ramp runs the other way when flipped
    assert 0.3 < flipped < 0.7
    u = torch.rand(64, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(D.augment(x, 'rrc', u=u)[:8], D.augment(x[:8], 'rrc', u=u[:8]))  # a slice of the draws
    u_full = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.9]]).expand(64, 5)  # area 1, ratio 1, centred, no flip
    assert torch.allclose(D.augment(x, 'rrc', u=u_full), x, atol=1e-5)
    with pytest.raises(ValueError, match=r"augmentation must be one of \('center', 'flip', 'rrc', 'pad_crop'\)"):
        D.augment(x, 'cutmix')


def test_a_truncated_image_is_named(tmp_path):
    from ldae_models.data import load_split
    from PIL import Image
    d = tmp_path / 'train' / 'a'
    d.mkdir(parents=True)
    Image.new('RGB', (16, 16), (200, 10, 10)).save(d / 'good.png')
    Image.new('RGB', (64, 64), (10, 200, 10)).save(d / 'bad.png')
    data = (d / 'bad.png').read_bytes()
    (d / 'bad.png').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r'bad\.png: cannot decode the image'):
        load_split('folder', tmp_path, 'train', 16, progress=False)


def test_a_subset_is_chosen_before_decoding(folder, monkeypatch):
    """load_split(limit=) decodes only the subset, and it is the subset ImageData.subset keeps (same images, order)."""
    from ldae_models.data import load_split
    decoded = []
    from ldae_models.data import loader as L
    original = L.decode_readable
    counting = lambda items, *a, **k: decoded.append(len(items)) or original(items, *a, **k)  # noqa: E731
    monkeypatch.setattr(L, 'decode_readable', counting)
    part = load_split('folder', folder, 'train', 16, progress=False, limit=7, seed=3)
    assert sum(decoded) == 7  # the 7 images, each once
    whole = load_split('folder', folder, 'train', 16, progress=False).subset(7, seed=3)
    assert torch.equal(part.images, whole.images) and torch.equal(part.labels, whole.labels)


def test_pad_crop_is_an_exact_shift_and_flip_is_a_mirror():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    u = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.9],    # offset (4, 4) of 0..8 with pad 4: no shift, no flip
                      [0.0, 0.0, 0.0, 0.99, 0.1]])  # offset (0, 8): 4 rows of fill above, 4 columns left, flipped
    y = D.augment(x, 'pad_crop', u=u)
    assert torch.equal(y[0], x[0])
    assert (y[1, :, :4] == -1).all() and torch.equal(y[1, :, 4:, 4:], x[1, :, :2, 4:].flip(-1))
    assert (y[1, :, 4:, :4] == -1).all()
    f = D.augment(x, 'flip', u=u)
    assert torch.equal(f[0], x[0]) and torch.equal(f[1], x[1].flip(-1))


def test_the_cifar_resnet_keeps_32_px_through_its_stem():
    import timm
    import ldae_models  # noqa: F401 -- registers resnet18_cifar
    m = timm.create_model('resnet18_cifar', features_only=True)
    assert [o.shape[-1] for o in m(torch.zeros(1, 3, 32, 32))] == [32, 32, 16, 8, 4]
    assert m.feature_info.reduction() == [1, 1, 2, 4, 8]
    net = timm.create_model('resnet18_cifar', num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == 11_173_962 and net.conv1.kernel_size == (3, 3)
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('resnet18_cifar', pretrained=True)


def test_pack_writes_the_npz_layouts_exact_or_jpeg_and_keeps_the_test_split_whole(folder, tmp_path):
    """``ldae-models pack``: ``--raw`` stores the decoded pixels exactly (the same images as the folder, labels with
    them); the JPEG layout reads back within JPEG's error; ``--max-bytes`` takes from the train split first."""
    from ldae_models.cli import main

    def rows(split):  # each image's bytes with its label, order-free
        return sorted((bytes(x.numpy().tobytes()), int(y)) for x, y in zip(split.images, split.labels))
    assert main(['pack', '--data-root', str(folder), '--out', str(tmp_path / 'raw.npz'), '--raw']) == 0
    for s in ('train', 'test'):
        assert rows(D.load_split('npz', tmp_path / 'raw.npz', s)) == rows(D.load_split('folder', folder, s))
    assert main(['pack', '--data-root', str(folder), '--out', str(tmp_path / 'j.npz')]) == 0
    jpeg, png = (D.load_split(k, p, 'test') for k, p in (('npz', tmp_path / 'j.npz'), ('folder', folder)))
    assert len(jpeg) == 16 and sorted(jpeg.labels.tolist()) == sorted(png.labels.tolist())
    with np.load(tmp_path / 'j.npz') as z:
        test_bytes, train_bytes = int(z['test_offsets'][-1]), int(z['train_offsets'][-1])
    budget = test_bytes + train_bytes // 2
    assert main(['pack', '--data-root', str(folder), '--out', str(tmp_path / 'small.npz'),
                 '--max-bytes', str(budget)]) == 0
    with np.load(tmp_path / 'small.npz') as z:
        assert len(z['y_test']) == 16 and 0 < len(z['y_train']) < 40
        assert int(z['test_offsets'][-1]) + int(z['train_offsets'][-1]) <= budget
    assert not list(tmp_path.glob('*.tmp.npz'))
