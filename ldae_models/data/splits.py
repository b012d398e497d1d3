"""Data sets the way users have them, as splits: ``open_split`` lists a split without decoding it (``loader`` decodes
it, into memory or as it streams).

A data set is named by a kind and a root (``--dataset KIND --data-root ROOT`` on the command line):

===============  =====================================================================================================
kind             root
===============  =====================================================================================================
``folder``       an ImageFolder: ``ROOT/train/<class>/*`` and ``ROOT/test`` (or ``ROOT/val``); ``ROOT/<class>/*``
                 is the train split
``cifar10``      torchvision's CIFAR-10 folder (``ROOT/cifar-10-batches-py``, what ``torchvision.datasets.CIFAR10(ROOT,
                 download=True)`` leaves); ``download=True`` fetches it where the network allows (md5 checked)
``npz``          a ``.npz`` file with ``{split}_jpeg`` + ``{split}_offsets`` (concatenated JPEG files) or ``x_{split}``
                 (N, H, W, 3 uint8), and ``y_{split}``: the layout of this project's CIFAR-10 copy
===============  =====================================================================================================

A ``Split`` holds labels, class names and, per image, what the data set stores (a file's path, a slice of encoded
bytes, or a uint8 array); it costs bytes per image, not pixels, so an ImageNet-size folder is listed in seconds and
streamed (``loader``). Paths are kept in one numpy array (not a list of Python strings), which DataLoader workers
share without copying. A decoded split is an ``ImageData``.

CIFAR-10's python files are pickles: they are read with an unpickler that accepts only numpy arrays and plain
containers, after their md5 is checked against the official release.
"""
import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .decode import Item

__all__ = ['ImageData', 'Split', 'ArraySplit', 'DATASETS', 'open_split', 'split_exists', 'check_data_root',
           'subset_indices', 'CIFAR10_FILES']

DATASETS = ('folder', 'cifar10', 'npz')
# torchvision's CIFAR-10 python release: the files and their md5 (the same list torchvision checks)
CIFAR10_DIR = 'cifar-10-batches-py'
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_TGZ_MD5 = 'c58f30108f718f92721af3b95e74349a'
CIFAR10_FILES = {
    'train': [('data_batch_1', 'c99cafc152244af753f735de768cd75f'), ('data_batch_2', 'd4bba439e000b95fd0a9bffe97cbabec'),
              ('data_batch_3', '54ebc095f3ab1f0389bbae665268c751'), ('data_batch_4', '634d18415352ddfa80567beed471001a'),
              ('data_batch_5', '482c414d41f54cd18b22e5b47cb7c3cb')],
    'test': [('test_batch', '40351d587109b95175f43aff81a1287e')],
}
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')



@dataclass
class ImageData:
    """A decoded split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), ``classes`` names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: Sequence[str]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: Union[str, torch.device]) -> 'ImageData':
        return ImageData(self.images.to(device), self.labels.to(device), self.classes)

    def subset(self, limit: int, seed: int = 0) -> 'ImageData':
        """A seeded random subset of ``limit`` images (0 or more than N: all); ``subset_indices`` chooses them."""
        idx = subset_indices(len(self), limit, seed)
        if idx is None:
            return self
        idx = idx.to(self.labels.device)
        return ImageData(self.images[idx], self.labels[idx], self.classes)



def subset_indices(n: int, limit: int, seed: int = 0) -> Optional[torch.Tensor]:
    """The images of a seeded random subset of ``limit`` of ``n`` (None: all of them), in the subset's order: what
    ``ImageData.subset`` and ``Split.subset`` keep."""
    if not limit or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]


class Split:
    """A split before decoding: ``labels`` (N,) int64, ``classes``, and ``item(i)`` (what the data set stores for
    image i: encoded bytes as a uint8 1-D tensor, or a uint8 (3, H, W) image) with ``name(i)`` for errors. A subset
    keeps the stored items and an index into them."""

    def __init__(self, labels: torch.Tensor, classes: Sequence[str], where: str,
                 index: Optional[np.ndarray] = None) -> None:
        self.labels, self.classes, self.where, self.index = labels, list(classes), where, index

    def __len__(self) -> int:
        return len(self.labels)

    def _item(self, j: int) -> Item:
        raise NotImplementedError

    def _name(self, j: int) -> str:
        return f'image {j} of {self.where}'

    def _pos(self, i: int) -> int:
        return int(self.index[i]) if self.index is not None else i

    def item(self, i: int) -> Item:
        return self._item(self._pos(i))

    def name(self, i: int) -> str:
        return self._name(self._pos(i))

    def take(self, idx: Union[torch.Tensor, Sequence[int]]) -> 'Split':
        """The images ``idx`` (positions in this split), in that order."""
        idx = np.asarray(idx.tolist() if torch.is_tensor(idx) else idx, dtype=np.int64)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.index = idx if self.index is None else self.index[idx]
        new.labels = self.labels[torch.from_numpy(idx)]
        return new

    def subset(self, limit: int, seed: int = 0) -> 'Split':
        """The seeded random subset of ``ImageData.subset`` (same images, same order), chosen before any decoding."""
        idx = subset_indices(len(self), limit, seed)
        return self if idx is None else self.take(idx)

    def nbytes(self, size: int) -> int:
        """Bytes of the split decoded at ``size`` x ``size``."""
        return len(self) * 3 * size * size



class FileSplit(Split):
    """Image files (an ImageFolder); the paths in one numpy bytes array."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, classes: Sequence[str], where: str) -> None:
        super().__init__(labels, classes, where)
        self.paths = np.array([str(p).encode() for p in paths], dtype=np.bytes_)

    def _item(self, j: int) -> Item:
        path = self.paths[j].decode()
        try:
            with open(path, 'rb') as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except OSError as e:  # unreadable: the decoder names it like an image it cannot decode
            raise ValueError(f'{path}: cannot read the file ({e.strerror or e})') from None

    def _name(self, j: int) -> str:
        return self.paths[j].decode()


class BytesSplit(Split):
    """Encoded images concatenated in one byte array, image j at ``buf[offsets[j]:offsets[j + 1]]``."""

    def __init__(self, buf: np.ndarray, offsets: np.ndarray, labels: torch.Tensor, classes: Sequence[str],
                 where: str) -> None:
        super().__init__(labels, classes, where)
        self.buf, self.offsets = buf, offsets

    def _item(self, j: int) -> Item:
        return torch.from_numpy(self.buf[self.offsets[j]:self.offsets[j + 1]].copy())


class ArraySplit(Split):
    """Decoded uint8 images (N, 3, H, W) (torchvision's CIFAR-10, an .npz of pixels)."""

    def __init__(self, images: np.ndarray, labels: torch.Tensor, classes: Sequence[str], where: str) -> None:
        super().__init__(labels, classes, where)
        self.images = images

    def _item(self, j: int) -> Item:
        return torch.from_numpy(np.ascontiguousarray(self.images[j]))

    def as_images(self, size: Optional[int]) -> Optional[ImageData]:
        """The images as they are stored, without a copy of the decoder's, when they already have ``size``."""
        if size is not None and tuple(self.images.shape[-2:]) != (size, size):
            return None
        x = self.images if self.index is None else self.images[self.index]
        return ImageData(torch.from_numpy(np.ascontiguousarray(x)), self.labels.clone(), self.classes)



def _npz_split(path: Path, split: str) -> Split:
    if not path.is_file():
        raise FileNotFoundError(f'--data-root {path}: no such .npz file')
    with np.load(path, allow_pickle=False) as d:
        keys = set(d.files)
        if f'y_{split}' not in keys:
            raise ValueError(f'{path} has no y_{split} array (keys: {", ".join(sorted(keys))})')
        labels = torch.from_numpy(d[f'y_{split}'].astype('int64'))
        classes = [str(c) for c in d['classes']] if 'classes' in keys else [str(i) for i in range(int(labels.max()) + 1)]
        where = f'{path.name} {split}'
        if f'{split}_jpeg' in keys:
            out: Split = BytesSplit(d[f'{split}_jpeg'], d[f'{split}_offsets'], labels, classes, where)
            count = len(out.offsets) - 1
        elif f'x_{split}' in keys:
            out = ArraySplit(np.ascontiguousarray(d[f'x_{split}'].transpose(0, 3, 1, 2)), labels, classes, where)
            count = len(out.images)
        else:
            raise ValueError(f'{path} has neither {split}_jpeg + {split}_offsets nor x_{split}')
    if count != len(labels):
        raise ValueError(f'{path}: {count} {split} images but {len(labels)} labels')
    return out


class _ArraysOnly(pickle.Unpickler):
    """An unpickler for CIFAR-10's python files: numpy arrays and plain containers only, nothing that runs code."""

    _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                ('numpy', 'ndarray'), ('numpy', 'dtype'),
                ('_codecs', 'encode')}  # bytes as pickled by protocol 2 under Python 3 (a pure str -> bytes)

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'refusing {module}.{name}: a CIFAR-10 batch file holds only numpy arrays')


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()



def _cifar10_split(root: Path, split: str, download: bool) -> Split:
    folder = root / CIFAR10_DIR
    if not folder.is_dir():
        if not download:
            raise FileNotFoundError(f'no {CIFAR10_DIR} under {root}: pass --download (or download=True), or point '
                                    f'--data-root at the folder torchvision.datasets.CIFAR10(root, download=True) used')
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(CIFAR10_URL, str(root), md5=CIFAR10_TGZ_MD5)
        except Exception as e:  # noqa: BLE001 -- no network: say so in one line
            raise OSError(f'cannot download CIFAR-10 from {CIFAR10_URL} (no network access?): {e}') from None
    images, labels = [], []
    for name, md5 in CIFAR10_FILES[split]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f'{path} is missing: the CIFAR-10 folder is incomplete (download it again)')
        if _md5(path) != md5:
            raise ValueError(f'{path} does not have the md5 of the official CIFAR-10 release (corrupt or modified): '
                             f'delete {folder} and download it again')
        with open(path, 'rb') as f:
            entry = _ArraysOnly(io.BytesIO(f.read()), encoding='bytes').load()
        images.append(entry[b'data'].reshape(-1, 3, 32, 32))
        labels += list(entry[b'labels'])
    return ArraySplit(np.concatenate(images), torch.tensor(labels, dtype=torch.int64), CIFAR10_CLASSES,
                      f'CIFAR-10 {split}')


def _folder_root(root: Path, split: str) -> Path:
    names = ('train',) if split == 'train' else ('test', 'val')
    for name in names:
        if (root / name).is_dir():
            return root / name
    if split == 'train' and root.is_dir():
        return root  # ROOT/<class>/* is the training split
    raise FileNotFoundError(f'no {" or ".join(names)} folder under {root}')



def _folder_split(root: Path, split: str) -> Split:
    from torchvision.datasets import ImageFolder
    folder = ImageFolder(str(_folder_root(root, split)))
    if len(folder) == 0:
        raise FileNotFoundError(f'no images under {folder.root}')
    return FileSplit([p for p, _ in folder.samples], torch.tensor(folder.targets, dtype=torch.int64), folder.classes,
                     str(folder.root))


def split_exists(dataset: str, root: Union[str, Path], split: str) -> bool:
    """Whether a data set has a split, without decoding it (torchvision's CIFAR-10 always has both)."""
    root = Path(root)
    if dataset == 'folder':
        try:
            _folder_root(root, split)
        except FileNotFoundError:
            return False
        return True
    if dataset == 'npz':
        if not root.is_file():
            raise FileNotFoundError(f'--data-root {root}: no such .npz file')
        with np.load(root, allow_pickle=False) as d:
            return f'y_{split}' in d.files
    return True


_LAYOUT = {'folder': 'an ImageFolder: ROOT/train/<class>/*.jpg and ROOT/test/ (or ROOT/val/)',
           'cifar10': "the folder torchvision.datasets.CIFAR10(ROOT, download=True) uses (add --download to fetch it)",
           'npz': 'an .npz file with {split}_jpeg + {split}_offsets (or x_{split}) and y_{split}'}


def check_data_root(dataset: str, root: Union[str, Path, None], splits: Sequence[str] = ('train',),
                    download: bool = False, hint: str = '') -> None:
    """Refuse, before any work, a data root that cannot give ``splits``, in one line that says what is wrong and what
    the data set should look like; ``hint`` is added where a split is missing (e.g. the flag that drops it)."""
    if dataset not in DATASETS:
        raise ValueError(f'--dataset must be one of {DATASETS}, got {dataset!r}')
    if not root:
        raise ValueError(f'--data-root is required ({_LAYOUT[dataset]})')
    path = Path(root)
    if dataset == 'cifar10' and download:
        return
    if not path.exists():
        raise FileNotFoundError(f'--data-root {root} does not exist (--dataset {dataset} reads {_LAYOUT[dataset]})')
    if dataset == 'npz' and not path.is_file():
        raise ValueError(f'--data-root {root} is a folder; --dataset npz reads {_LAYOUT["npz"]}')
    if dataset != 'npz' and not path.is_dir():
        raise ValueError(f'--data-root {root} is a file; --dataset {dataset} reads {_LAYOUT[dataset]}')
    if dataset == 'cifar10':
        if not (path / CIFAR10_DIR).is_dir():
            raise FileNotFoundError(f'--data-root {root} has no {CIFAR10_DIR}/ folder: add --download, or point it at '
                                    f'{_LAYOUT["cifar10"]}')
        return
    for split in splits:
        if not split_exists(dataset, path, split):
            where = 'ROOT/test/ or ROOT/val/' if split == 'test' else 'ROOT/train/'
            what = f'no {where} folder' if dataset == 'folder' else f'no y_{split} array'
            raise FileNotFoundError(f'--data-root {root} has {what} ({_LAYOUT[dataset]})' + (f'; {hint}' if hint else ''))


def open_split(dataset: str, root: Union[str, Path], split: str = 'train', download: bool = False,
               limit: int = 0, seed: int = 0) -> Split:
    """A split (``'train'`` or ``'test'``) of a data set, listed but not decoded; ``limit`` keeps a seeded random
    subset of that many images (``subset_indices``)."""
    if dataset not in DATASETS:
        raise ValueError(f'--dataset must be one of {DATASETS}, got {dataset!r}')
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if dataset == 'npz':
        out = _npz_split(root, split)
    elif dataset == 'cifar10':
        out = _cifar10_split(root, split, download)
    else:
        out = _folder_split(root, split)
    return out.subset(limit, seed)

