"""Training data: the embedded 8x8 digits and checks on any image tensor."""

from __future__ import annotations

import dataclasses
import hashlib
from importlib import resources
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "DataError", "load_digits"]


class DataError(ValueError):
    """Training or query images that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images float32 [n, C, H, W] in data scale [-1, 1], optional integer labels [n]."""

    images: Tensor
    labels: Optional[Tensor] = None
    name: str = "images"

    def __post_init__(self):
        check_images(self.images, self.name)
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def data_shape(self) -> Tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def fingerprint(self) -> str:
        """SHA-256 of the images: ties checkpoints and results to the data they came from."""
        array = np.ascontiguousarray(self.images.numpy())
        return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()


def check_images(images: Tensor, what: str = "images", shape: Optional[Sequence[int]] = None,
                 allow_empty: bool = False) -> None:
    """Raise :class:`DataError` for anything but a non-empty finite float tensor [n, C, H, W],
    of images of ``shape`` [C, H, W] when given (empty only with ``allow_empty``)."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"{what} must be a tensor [n, C, H, W], got {got}")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise DataError(f"{what} have shape [C, H, W] = {list(images.shape[1:])}, expected "
                        f"{list(shape)}: images of another data set or model")
    if len(images) == 0 and not allow_empty:
        raise DataError(f"{what} is empty")
    if not images.is_floating_point():
        raise DataError(f"{what} must be floating point, got {images.dtype}")
    bad = ~torch.isfinite(images)
    if bad.any():
        first = bad.flatten(1).any(1).nonzero()[0].item()
        raise DataError(f"{what} holds NaN or Inf values (first in image {first})")


def load_digits() -> Dataset:
    """The 1,797 UCI handwritten digits of 8x8 pixels shipped with the package, scaled from
    0..16 to [-1, 1], with their labels 0..9. See ``ensattr_fast/data/README.md``."""
    with resources.files("ensattr_fast").joinpath("data/digits.npz").open("rb") as f:
        arrays = np.load(f)
        images, labels = arrays["images"], arrays["labels"]
    pixels = torch.from_numpy(images.astype(np.float32))[:, None] / 8.0 - 1.0
    return Dataset(pixels, torch.from_numpy(labels.astype(np.int64)), name="digits")
