"""Where images come from: data sets in memory (or streamed), and batched augmentation on the device.

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

``load_split`` decodes a split once into an ``ImageData``: uint8 images (N, 3, H, W) and int64 labels, resized
(shorter side) and center-cropped to the model's size when they differ. That fits CIFAR-10 (150 MB) and any data
set of a similar size; it moves to the GPU with ``.to(device)`` and batches are cut from it there, so a training step
reads no file and decodes nothing. ImageNet-scale folders stream instead (``train.py``'s DataLoader path).

CIFAR-10's python files are pickles: they are read with an unpickler that accepts only numpy arrays and plain
containers, after their md5 is checked against the official release.
"""
import hashlib
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ['ImageData', 'DATASETS', 'load_split', 'split_exists', 'subset_indices', 'normalize', 'augment', 'open_rgb', 'CIFAR10_FILES']

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

    def batches(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) in order, ``batch_size`` at a time."""
        for i in range(0, len(self), batch_size):
            yield self.images[i:i + batch_size], self.labels[i:i + batch_size]


def subset_indices(n: int, limit: int, seed: int = 0) -> Optional[torch.Tensor]:
    """The images of a seeded random subset of ``limit`` of ``n`` (None: all of them), in the subset's order: what
    ``ImageData.subset`` keeps and ``load_split(limit=)`` decodes."""
    if not limit or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]


def normalize(images: torch.Tensor, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)
              ) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std`` on the images' device (default: [-1, 1])."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


# -- augmentation on the device ---------------------------------------------------------------------------------

def augment(images: torch.Tensor, mode: str, generator: Optional[torch.Generator] = None,
            scale: Tuple[float, float] = (0.2, 1.0), ratio: Tuple[float, float] = (3 / 4, 4 / 3),
            u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batched augmentation of float images (B, C, H, W), the random draws from ``generator`` (or given: ``u``, (B, 5)
    uniforms in [0, 1), so that a rank can take its slice of draws made for a whole global batch).

    ``'center'``: none (the images are already center-cropped to size: the paper's default). ``'rrc'``: a random
    resized crop (area fraction in ``scale``, aspect ratio in ``ratio``, log-uniform; MAE's ranges) back to H x W with
    bilinear sampling, and a horizontal flip with probability 1/2.
    """
    if mode == 'center':
        return images
    if mode != 'rrc':
        raise ValueError(f"augmentation must be 'center' or 'rrc', got {mode!r}")
    B = images.shape[0]
    if u is None:
        dev = generator.device if generator is not None else images.device
        u = torch.rand(B, 5, generator=generator, device=dev)
    u = u.to(images.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)   # crop width and height as fractions of the image
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)       # crop centre in [-1, 1] coordinates, the crop inside the image
    cy = (1 - h) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode='bilinear', padding_mode='reflection', align_corners=False)


# -- decoding ----------------------------------------------------------------------------------------------------

def _resize_crop(img: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """uint8 (C, H, W): shorter side to ``size`` (bicubic, antialiased), then a center crop; as is without a size."""
    if size is None or tuple(img.shape[-2:]) == (size, size):
        return img
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import center_crop, resize
    return center_crop(resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True), [size, size])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit='img', disable=None if enabled else True, leave=False)


def _decode(sources: List[Union[bytes, str]], size: Optional[int], desc: str, progress: bool) -> torch.Tensor:
    """Decode encoded images (bytes) or image files (paths) with Pillow into uint8 (N, 3, H, W), resized when asked."""
    import numpy as np
    from PIL import Image
    out = []
    with _progress(len(sources), desc, progress) as bar:
        for i, src in enumerate(sources):
            try:
                with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                    img = torch.from_numpy(np.asarray(im.convert('RGB')).copy()).permute(2, 0, 1)
            except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated, unidentified, corrupt
                raise ValueError(f'{describe_source(src, i, desc)}: cannot decode the image ({e})') from None
            out.append(_resize_crop(img, size))
            bar.update(1)
    return torch.stack(out)


def describe_source(src: Union[bytes, str], index: int, desc: str) -> str:
    """How an error names an image: its path, or its index in an array of encoded images."""
    return str(src) if not isinstance(src, bytes) else f'image {index} of {desc.replace("decoding ", "")}'


def open_rgb(path: str):
    """A PIL RGB image of a file, or a ``ValueError`` that names the file (truncated, not an image, unreadable)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f'{path}: cannot decode the image ({e})') from None


def _npz_split(path: Path, split: str, size: Optional[int], progress: bool, limit: int = 0, seed: int = 0
               ) -> ImageData:
    import numpy as np
    if not path.is_file():
        raise FileNotFoundError(f'--data-root {path}: no such .npz file')
    with np.load(path, allow_pickle=False) as d:
        keys = set(d.files)
        if f'y_{split}' not in keys:
            raise ValueError(f'{path} has no y_{split} array (keys: {", ".join(sorted(keys))})')
        labels = torch.from_numpy(d[f'y_{split}'].astype('int64'))
        classes = [str(c) for c in d['classes']] if 'classes' in keys else [str(i) for i in range(int(labels.max()) + 1)]
        idx = subset_indices(len(labels), limit, seed)
        chosen = range(len(labels)) if idx is None else idx.tolist()
        labels = labels if idx is None else labels[idx]
        if f'{split}_jpeg' in keys:
            buf, off = d[f'{split}_jpeg'], d[f'{split}_offsets']
            images = _decode([buf[off[i]:off[i + 1]].tobytes() for i in chosen], size,
                             f'decoding {path.name} {split}', progress)
        elif f'x_{split}' in keys:
            x = d[f'x_{split}']
            images = torch.from_numpy(x if idx is None else x[idx.numpy()]).permute(0, 3, 1, 2).contiguous()
            if size is not None and images.shape[-1] != size:
                images = torch.stack([_resize_crop(im, size) for im in images])
        else:
            raise ValueError(f'{path} has neither {split}_jpeg + {split}_offsets nor x_{split}')
    if len(images) != len(labels):
        raise ValueError(f'{path}: {len(images)} {split} images but {len(labels)} labels')
    return ImageData(images, labels, classes)


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


def _cifar10_split(root: Path, split: str, size: Optional[int], download: bool, limit: int = 0, seed: int = 0
                   ) -> ImageData:
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
        data = entry[b'data']
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels += list(entry[b'labels'])
    x, y = torch.cat(images), torch.tensor(labels, dtype=torch.int64)
    idx = subset_indices(len(y), limit, seed)
    if idx is not None:
        x, y = x[idx], y[idx]
    if size is not None and size != 32:
        x = torch.stack([_resize_crop(im, size) for im in x])
    return ImageData(x, y, CIFAR10_CLASSES)


def _folder_root(root: Path, split: str) -> Path:
    names = ('train',) if split == 'train' else ('test', 'val')
    for name in names:
        if (root / name).is_dir():
            return root / name
    if split == 'train' and root.is_dir():
        return root  # ROOT/<class>/* is the training split
    raise FileNotFoundError(f'no {" or ".join(names)} folder under {root}')


def _folder_split(root: Path, split: str, size: Optional[int], progress: bool, limit: int = 0, seed: int = 0
                  ) -> ImageData:
    from torchvision.datasets import ImageFolder
    folder = ImageFolder(str(_folder_root(root, split)))
    if len(folder) == 0:
        raise FileNotFoundError(f'no images under {folder.root}')
    idx = subset_indices(len(folder), limit, seed)
    samples = folder.samples if idx is None else [folder.samples[i] for i in idx.tolist()]
    images = _decode([p for p, _ in samples], size, f'decoding {folder.root}', progress)
    return ImageData(images, torch.tensor([c for _, c in samples], dtype=torch.int64), folder.classes)


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
        import numpy as np
        with np.load(root, allow_pickle=False) as d:
            return f'y_{split}' in d.files
    return True


def load_split(dataset: str, root: Union[str, Path], split: str = 'train', img_size: Optional[int] = None,
               download: bool = False, progress: bool = True, limit: int = 0, seed: int = 0) -> ImageData:
    """Decode a split (``'train'`` or ``'test'``) of a data set into memory (see the module docstring).

    ``img_size`` resizes (shorter side) and center-crops images of another size; decoding shows a progress bar.
    ``limit`` decodes only a seeded random subset of that many images (``ImageData.subset``'s, chosen before any
    decoding: the memory and the time of the subset, not of the split).
    """
    if dataset not in DATASETS:
        raise ValueError(f'--dataset must be one of {DATASETS}, got {dataset!r}')
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if dataset == 'npz':
        return _npz_split(root, split, img_size, progress, limit, seed)
    if dataset == 'cifar10':
        return _cifar10_split(root, split, img_size, download, limit, seed)
    return _folder_split(root, split, img_size, progress, limit, seed)
