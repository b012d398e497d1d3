"""Where images come from: data sets as splits, listed without decoding (``splits``), the one decoder (``decode``),
what happens to a batch on the device (``augment``), and the batches that feed a device, in memory or streamed
(``loader``)."""
from .augment import AUGMENTATIONS, augment, normalize
from .decode import Packed, decode_batch, decode_pil, decode_readable, is_jpeg, read_images, resize_crop
from .loader import (BAD_POLICIES, decode_split, default_workers, fits_in_memory, load_split, read_batches,
                     sequential, stream, training_data)
from .splits import (CIFAR10_FILES, DATASETS, ImageData, Split, check_data_root, open_split, split_exists,
                     subset_indices)

__all__ = ['ImageData', 'Split', 'DATASETS', 'AUGMENTATIONS', 'BAD_POLICIES', 'open_split', 'load_split',
           'split_exists', 'check_data_root', 'subset_indices', 'decode_batch', 'decode_readable', 'decode_pil',
           'read_images', 'is_jpeg', 'resize_crop', 'Packed', 'augment', 'normalize', 'read_batches', 'stream',
           'sequential', 'decode_split', 'default_workers', 'fits_in_memory', 'training_data', 'CIFAR10_FILES']
