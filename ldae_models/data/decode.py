"""Turning what a data set holds (JPEG bytes, other encoded files, uint8 arrays) into uint8 images of one size.

``decode_batch(items, size, device)`` is the one decoder of the zoo: the in-memory path (``load_split``), the streaming
loader of training and of evaluation, and the PCA fit all go through it, so every path sees the same pixels:

- JPEG bytes are decoded in one batched call of ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on a GPU,
  libjpeg-turbo on a CPU);
- any other file (PNG, WebP, ...) and any JPEG that torchvision cannot read is decoded by Pillow (with
  ``Image.draft``, the JPEG decoder's DCT-domain reduction, when the image is at least twice the size asked for);
- uint8 arrays (torchvision's CIFAR-10 files, an .npz of pixels) are taken as they are.

Each image is then resized (shorter side to ``size``, bicubic, antialiased) and center-cropped to ``size`` x ``size``
where its size differs: the one crop of every path. Random crops and flips are drawn later on the device, from this
square (``loader.augment``). An image that cannot be decoded raises a ``ValueError`` naming it.
"""
import io
from typing import List, Optional, Sequence, Union

import torch

__all__ = ['decode_batch', 'decode_pil', 'resize_crop', 'is_jpeg']

Item = Union[torch.Tensor, bytes]  # encoded bytes (uint8 1-D tensor or bytes) or a decoded uint8 (3, H, W) image


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


def _decode_jpegs(data: List[torch.Tensor], names: List[str], device: torch.device) -> List[torch.Tensor]:
    decoder = _torchvision_decoder()
    if decoder is None:
        return [decode_pil(d.cpu(), None, name).to(device) for d, name in zip(data, names)]
    decode_jpeg, rgb = decoder
    mode = dict(mode=rgb)
    try:
        return list(decode_jpeg(data, device=device, **mode))
    except RuntimeError:  # one bad file fails the batch: decode one by one to name it (or to read it with Pillow)
        out = []
        for d, name in zip(data, names):
            try:
                out.append(decode_jpeg(d, device=device, **mode))
            except RuntimeError:  # a JPEG torchvision refuses (CMYK on old builds, damaged): Pillow decides
                out.append(decode_pil(d.cpu(), None, name).to(device))
        return out


def decode_batch(items: Sequence[Item], size: Optional[int], device: Union[str, torch.device] = 'cpu',
                 names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """uint8 (B, 3, size, size) on ``device`` from encoded bytes or uint8 (3, H, W) images (see the module
    docstring); ``names`` name the items in errors (paths, or 'image i of X'). Without ``size`` every image must
    already share one size."""
    device = torch.device(device)
    names = list(names) if names is not None else [f'image {i}' for i in range(len(items))]
    out: List[Optional[torch.Tensor]] = [None] * len(items)
    jpeg_at, jpegs = [], []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray)):
            item = torch.frombuffer(bytearray(item), dtype=torch.uint8)
        if item.ndim == 3:  # decoded already
            out[i] = resize_crop(item.to(device, non_blocking=True), size)
        elif is_jpeg(item):  # the bytes stay on the CPU (torchvision's rule); nvJPEG decodes them to the GPU
            jpeg_at.append(i)
            jpegs.append(item.cpu())
        else:
            out[i] = decode_pil(item.cpu(), size, names[i]).to(device)
    if jpegs:
        decoded = _decode_jpegs(jpegs, [names[i] for i in jpeg_at], device)
        for i, img in zip(jpeg_at, decoded):
            out[i] = resize_crop(img, size)
    shapes = {tuple(o.shape) for o in out}
    if len(shapes) > 1:
        raise ValueError(f'images of different sizes {sorted(shapes)[:3]}: pass an image size to resize them to')
    return torch.stack(out) if out else torch.empty(0, 3, size or 0, size or 0, dtype=torch.uint8, device=device)
