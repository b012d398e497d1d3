"""Turning what a data set holds (JPEG bytes, other encoded files, uint8 arrays) into uint8 images of one size.

``decode_batch(items, size, device)`` is the one decoder of the zoo: decoding into memory, the streaming loader of
training and of evaluation, the PCA fit, the demo's own images and ``check-data`` all go through it, so every path
sees the same pixels:

- JPEG bytes are decoded in one batched call of ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on a GPU,
  libjpeg-turbo on a CPU);
- any other file (PNG, WebP, ...) and any JPEG that torchvision cannot read is decoded by Pillow (with
  ``Image.draft``, the JPEG decoder's DCT-domain reduction, when the image is at least twice the size asked for);
- uint8 arrays (torchvision's CIFAR-10 files, an .npz of pixels) are taken as they are.

Each image is then resized (shorter side to ``size``, bicubic, antialiased) and center-cropped to ``size`` x ``size``
where its size differs: the one crop of every path. Random crops and flips are drawn later on the device, from this
square (``augment``).

Encoded items travel as a ``Packed`` batch, all the bytes in one tensor and their offsets: one shared-memory file
descriptor per batch between DataLoader workers and the main process, not one per image.

On a GPU, ``decode_jpeg`` writes into memory that PyTorch's caching allocator handed out on the caller's stream
without waiting for the work queued there (nvJPEG's hardware path does not order against it: freed blocks still read
by a queued backward pass could be overwritten). The caller's stream is therefore drained before every device decode
(``_drain``): one host wait per decoded batch, on the streaming GPU path only.

An image that cannot be decoded is named by its path: ``decode_batch`` raises a ``ValueError`` naming it;
``decode_readable`` returns the readable ones and the names of the others (``--skip-bad-images``).
"""
import io
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = ['Packed', 'pack', 'decode_batch', 'decode_readable', 'decode_pil', 'resize_crop', 'is_jpeg', 'read_images']

Item = Union[torch.Tensor, bytes]  # encoded bytes (uint8 1-D tensor or bytes) or a decoded uint8 (3, H, W) image


class Packed(NamedTuple):
    """Encoded images of a batch in one uint8 tensor: image i is ``data[offsets[i]:offsets[i + 1]]``."""

    data: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def items(self) -> List[torch.Tensor]:
        """Views of each image's bytes (no copy)."""
        off = self.offsets.tolist()
        return [self.data[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def pack(items: Sequence[Item]) -> Union[Packed, torch.Tensor, List[Item]]:
    """A batch's items as one tensor: encoded bytes -> ``Packed``; decoded images of one shape -> (B, 3, H, W);
    anything else (images of several shapes, or both kinds) stays a list."""
    tensors = [torch.frombuffer(bytearray(x), dtype=torch.uint8) if isinstance(x, (bytes, bytearray)) else x
               for x in items]
    if tensors and all(t.ndim == 1 for t in tensors):
        offsets = torch.zeros(len(tensors) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor([len(t) for t in tensors]).cumsum(0)
        return Packed(torch.cat(tensors), offsets)
    if tensors and all(t.ndim == 3 for t in tensors) and len({tuple(t.shape) for t in tensors}) == 1:
        return torch.stack(tensors)
    return list(tensors)


def is_jpeg(data: Union[torch.Tensor, bytes]) -> bool:
    """Whether encoded bytes are a JPEG file (its SOI marker and the first segment's marker byte)."""
    head = bytes(data[:3].tolist()) if torch.is_tensor(data) else bytes(data[:3])
    return head == b'\xff\xd8\xff'


def resize_crop(img: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """uint8 (C, H, W) on any device: shorter side to ``size`` (bicubic, antialiased), then the center square; as it
    is without a size or when it is ``size`` x ``size`` already."""
    if size is None or tuple(img.shape[-2:]) == (size, size):
        return img
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import center_crop, resize
    return center_crop(resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True), [size, size])


def decode_pil(data: Union[torch.Tensor, bytes, str], size: Optional[int] = None, name: str = 'image',
               draft: bool = True) -> torch.Tensor:
    """Pillow's decode of encoded bytes or a file into uint8 (3, H, W), resized and cropped to ``size``. With
    ``draft`` a JPEG at least twice ``size`` on its shorter side is decoded at a reduced scale (1/2 to 1/8, never
    below ``size``), which makes large JPEGs several times cheaper; the pixels then differ slightly from a full
    decode followed by the resize."""
    import numpy as np
    from PIL import Image
    if torch.is_tensor(data):
        data = data.numpy().tobytes()
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as im:
            if draft and size is not None and im.format == 'JPEG':
                w, h = im.size
                scale = min(w, h) / size
                if scale >= 2:
                    im.draft('RGB', (int(round(w / scale)), int(round(h / scale))))
            arr = np.asarray(im.convert('RGB'))
    except (OSError, ValueError, SyntaxError) as e:  # Pillow: truncated, unidentified, corrupt
        raise ValueError(f'{name}: cannot decode the image ({e})') from None
    return resize_crop(torch.from_numpy(arr.copy()).permute(2, 0, 1), size)


_DEPRECATED = '.*image decoding and encoding capabilities of TorchVision.*'


def _torchvision_decoder():
    """torchvision's ``decode_jpeg`` (and its mode), or None where this torchvision has none. torchvision 0.29
    deprecated its image decoders in favour of TorchCodec (each call warns); until they are removed they are the
    batched GPU decoder at hand, and without them every JPEG goes to Pillow."""
    import warnings
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message=_DEPRECATED, category=DeprecationWarning)
            return decode_jpeg(*args, **kwargs)
    return decode, ImageReadMode.RGB


def _drain(device: torch.device) -> None:
    """Wait for the work queued on the caller's stream of ``device`` before a decoder writes there (see the module
    docstring); nothing on a CPU."""
    if device.type == 'cuda':
        torch.cuda.current_stream(device).synchronize()


def _decode_jpegs(data: List[torch.Tensor], names: List[str], device: torch.device
                  ) -> List[Union[torch.Tensor, str]]:
    """Each JPEG decoded on ``device``, or the reason it could not be (a string)."""
    decoder = _torchvision_decoder()
    out: List[Union[torch.Tensor, str]] = []
    if decoder is None:
        for d, name in zip(data, names):
            try:
                out.append(decode_pil(d, None, name).to(device))
            except ValueError as e:
                out.append(str(e))
        return out
    decode_jpeg, rgb = decoder
    _drain(device)
    try:
        return list(decode_jpeg(data, device=device, mode=rgb))
    except RuntimeError:  # one bad file fails the batch: decode one by one to name it (or to read it with Pillow)
        pass
    for d, name in zip(data, names):
        try:
            out.append(decode_jpeg(d, device=device, mode=rgb))
        except RuntimeError:  # a JPEG torchvision refuses (CMYK on old builds, damaged): Pillow decides
            try:
                out.append(decode_pil(d, None, name).to(device))
            except ValueError as e:
                out.append(str(e))
    return out


def decode_readable(items: Union[Packed, torch.Tensor, Sequence[Item]], size: Optional[int],
                    device: Union[str, torch.device] = 'cpu', names: Optional[Sequence[str]] = None
                    ) -> Tuple[torch.Tensor, List[int], List[str]]:
    """The readable images of a batch: (uint8 (K, 3, size, size) on ``device``, their positions in the batch, one line
    per unreadable item naming it). ``items``: a ``Packed`` batch, a (B, 3, H, W) tensor, or a list of encoded bytes
    and decoded (3, H, W) images. Without ``size`` every image must already share one size."""
    device = torch.device(device)
    if torch.is_tensor(items) and items.ndim == 4:  # decoded already, one size
        out = items.to(device, non_blocking=device.type == 'cuda')
        if size is not None and tuple(out.shape[-2:]) != (size, size):
            out = torch.stack([resize_crop(x, size) for x in out])
        return out, list(range(len(out))), []
    items = items.items() if isinstance(items, Packed) else list(items)
    names = list(names) if names is not None else [f'image {i}' for i in range(len(items))]
    got: List[Union[torch.Tensor, str, None]] = [None] * len(items)
    jpeg_at, jpegs = [], []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray)):
            item = torch.frombuffer(bytearray(item), dtype=torch.uint8)
        if item.ndim == 3:  # decoded already
            got[i] = resize_crop(item.to(device, non_blocking=device.type == 'cuda'), size)
        elif is_jpeg(item):  # the bytes stay on the CPU (torchvision's rule); nvJPEG decodes them to the GPU
            jpeg_at.append(i)
            jpegs.append(item.cpu())
        else:
            try:
                got[i] = decode_pil(item.cpu(), size, names[i]).to(device, non_blocking=device.type == 'cuda')
            except ValueError as e:
                got[i] = str(e)
    if jpegs:
        for i, img in zip(jpeg_at, _decode_jpegs(jpegs, [names[i] for i in jpeg_at], device)):
            got[i] = img if isinstance(img, str) else resize_crop(img, size)
    kept = [i for i, g in enumerate(got) if torch.is_tensor(g)]
    bad = [g if ': cannot decode' in g else f'{names[i]}: cannot decode the image ({g})'
           for i, g in enumerate(got) if isinstance(g, str)]
    shapes = {tuple(got[i].shape) for i in kept}
    if len(shapes) > 1:
        raise ValueError(f'images of different sizes {sorted(shapes)[:3]}: pass an image size to resize them to')
    images = (torch.stack([got[i] for i in kept]) if kept else
              torch.empty(0, 3, size or 0, size or 0, dtype=torch.uint8, device=device))
    return images, kept, bad


def decode_batch(items: Union[Packed, torch.Tensor, Sequence[Item]], size: Optional[int],
                 device: Union[str, torch.device] = 'cpu', names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """uint8 (B, 3, size, size) on ``device`` (see ``decode_readable``); an unreadable image raises a ``ValueError``
    naming it."""
    images, _, bad = decode_readable(items, size, device, names)
    if bad:
        raise ValueError(bad[0] + (f' (and {len(bad) - 1} more in this batch)' if len(bad) > 1 else ''))
    return images


def read_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """Image files decoded by ``decode_batch`` into uint8 (N, 3, size, size): a missing file or one that is not an
    image is named."""
    import os
    items = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f'image not found: {p}')
        with open(p, 'rb') as f:
            items.append(f.read())
    return decode_batch(items, size, names=list(paths))
