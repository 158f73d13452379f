"""Training data: the embedded 8x8 digits, users' own images (folders, arrays, HDF5), the
specs plans store to reload them, their partition into units, and checks on any image tensor.

Every loader returns a :class:`Dataset` of images float32 [n, C, H, W] in data scale [-1, 1]
(or, for latents loaded with ``scale=False``, whatever values they hold). Data sets too large
for memory stay on disk as :class:`DiskImages` and are read on demand with
:meth:`Dataset.read`. What a plan stores to reload the data is a small JSON spec, read back by
:func:`load_dataset`.
"""

from ..errors import DataError
from .canaries import plant_canaries
from .dataset import Dataset, check_images
from .disk import DiskImages
from .conditions import load_conditions
from .loaders import load_arrays, load_digits, load_hdf5, load_image_folder, read_unit_metadata
from .spec import (DATASET_KINDS, DATASETS, UNIT_KINDS, data_spec, duplicates_in, load_data, load_dataset,
                   units_for)

__all__ = ["Dataset", "DataError", "DiskImages", "check_images", "load_arrays", "load_conditions", "load_dataset",
           "load_digits", "load_hdf5", "load_image_folder", "read_unit_metadata", "DATASET_KINDS",
           "DATASETS", "UNIT_KINDS", "data_spec", "load_data", "units_for", "duplicates_in", "plant_canaries"]
