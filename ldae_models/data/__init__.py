"""Where images come from: data sets as splits (``splits``), the one decoder (``decode``), and the batches that feed
a device, in memory or streamed (``loader``)."""
from .decode import decode_batch, decode_pil, is_jpeg, resize_crop
from .loader import (AUGMENTATIONS, augment, batches, default_workers, fits_in_memory, in_memory_data, normalize,
                     sequential, stream)
from .splits import (CIFAR10_FILES, DATASETS, ImageData, Split, load_split, open_rgb, open_split, split_exists,
                     subset_indices)

__all__ = ['ImageData', 'Split', 'DATASETS', 'AUGMENTATIONS', 'open_split', 'load_split', 'split_exists',
           'subset_indices', 'open_rgb', 'decode_batch', 'decode_pil', 'is_jpeg', 'resize_crop', 'augment',
           'normalize', 'batches', 'stream', 'sequential', 'default_workers', 'fits_in_memory', 'in_memory_data',
           'CIFAR10_FILES']
