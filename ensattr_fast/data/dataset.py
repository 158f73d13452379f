"""The data everything trains on and is checked against: :class:`Dataset` (images float32
[n, C, H, W] in [-1, 1], in memory or on disk, with labels, groups and example names) and
:func:`check_images`, the one check of any image tensor."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .disk import DiskImages
from .layout import _as_index


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Images float32 [n, C, H, W] in data scale [-1, 1] (a tensor, or :class:`DiskImages` read
    on demand), optional integer labels [n], the group of each example (artist, person, folder),
    a name for each example (a path relative to the folder root, or its index), and optional
    embedding conditions float32 [n, L, D] (a text encoder's outputs) for text-conditioned members."""

    images: Union[Tensor, DiskImages]
    labels: Optional[Tensor] = None
    name: str = "images"
    groups: Optional[Tuple[str, ...]] = None
    example_names: Optional[Tuple[str, ...]] = None
    conditions: Optional[Tensor] = None

    def __post_init__(self):
        check_images(self.images, self.name)
        n = len(self.images)
        if self.labels is not None and len(self.labels) != n:
            raise DataError(f"{self.name}: {len(self.labels)} labels for {n} images")
        if self.conditions is not None and (self.conditions.dim() != 3 or len(self.conditions) != n):
            raise DataError(f"{self.name}: conditions must be [{n}, L, D], one per image, got "
                            f"{list(self.conditions.shape)}")
        for field in ("groups", "example_names"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, (str, bytes)):
                raise DataError(f"{self.name}: {field} must be a sequence of strings, one per image")
            value = tuple(str(v) for v in value)
            if len(value) != n:
                raise DataError(f"{self.name}: {len(value)} {field.replace('_', ' ')} for {n} images")
            object.__setattr__(self, field, value)
        if self.example_names is not None and len(set(self.example_names)) != n:
            seen: set = set()
            dup = next(e for e in self.example_names if e in seen or seen.add(e))
            raise DataError(f"{self.name}: example name '{dup}' appears twice")

    def __len__(self) -> int:
        return len(self.images)

    def class_labels(self, classes: int) -> Tensor:
        """The labels int64 [n] that members conditioned on ``classes`` classes train on, or a
        :class:`DataError` where there are none or one lies outside 0..classes-1."""
        if self.labels is None:
            raise DataError(f"these members are class-conditional but {self.name} has no labels")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= classes):
            raise DataError(f"{self.name} has labels {int(self.labels.min())}..{int(self.labels.max())}; "
                            f"the members know classes 0..{classes - 1}")
        return self.labels.long()

    @property
    def condition_shape(self) -> Optional[Tuple[int, int]]:
        """(L, D) of each example's embedding condition, or None where the data has none."""
        return None if self.conditions is None else tuple(self.conditions.shape[1:])

    @property
    def in_memory(self) -> bool:
        """Whether the images are a tensor in memory (else they stay on disk)."""
        return isinstance(self.images, Tensor)

    @property
    def data_shape(self) -> Tuple[int, ...]:
        """The shape of one image [C, H, W]."""
        return tuple(self.images.shape[1:])

    def read(self, index: Union[Tensor, Sequence[int], np.ndarray]) -> Tensor:
        """float32 [k, C, H, W] of the images ``index`` (int [k], any order, repeats allowed),
        from memory or from disk."""
        if self.in_memory:
            idx = torch.from_numpy(_as_index(index, len(self), self.name))
            return self.images[idx].to(torch.float32)
        return self.images.read(index)

    def blocks(self, rows: int = 4096) -> Iterator[Tensor]:
        """Every image in order, ``rows`` at a time (float32 [<=rows, C, H, W]): a pass over
        the data that never holds data on disk whole."""
        if not self.in_memory:
            yield from self.images.chunks(rows)
            return
        for start in range(0, len(self), rows):
            yield self.images[start : start + rows].to(torch.float32)

    def pixel_distances(self, queries: Tensor) -> Tensor:
        """L2 distances [Q, n] of flattened ``queries`` [Q, C, H, W] to every image."""
        q = queries.flatten(1).float()
        return torch.cat([torch.cdist(q, block.flatten(1)) for block in self.blocks()], 1)

    def fingerprint(self) -> str:
        """SHA-256 of the images (and of the embedding conditions, where there are some): ties
        checkpoints and results to the data they came from. Data on disk is hashed block by
        block and gives the same digest as the same values in memory."""
        if self.in_memory:
            array = np.ascontiguousarray(self.images.numpy())
            images = hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()
        else:
            digest = hashlib.sha256()
            for block in self.images.chunks(self.images.chunk_rows()):
                digest.update(np.ascontiguousarray(block.numpy()).tobytes())
            digest.update(str(tuple(int(s) for s in self.images.shape)).encode())
            images = digest.hexdigest()
        if self.conditions is None:
            return images
        conditions = np.ascontiguousarray(self.conditions.numpy())
        return hashlib.sha256(images.encode() + conditions.tobytes() + str(conditions.shape).encode()).hexdigest()


def check_images(images: Union[Tensor, DiskImages], what: str = "images", shape: Optional[Sequence[int]] = None,
                 allow_empty: bool = False) -> None:
    """Raise :class:`DataError` for anything but a non-empty finite float tensor [n, C, H, W],
    of images of ``shape`` [C, H, W] when given (empty only with ``allow_empty``). Images on
    disk (:class:`DiskImages`) are checked block by block, once."""
    disk = isinstance(images, DiskImages)
    if not disk and (not isinstance(images, Tensor) or images.dim() != 4):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise DataError(f"{what} must be a tensor [n, C, H, W], got {got}")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise DataError(f"{what} have shape [C, H, W] = {list(images.shape[1:])}, expected "
                        f"{list(shape)}: images of another data set or model")
    if len(images) == 0 and not allow_empty:
        raise DataError(f"{what} is empty")
    if disk:
        first, _ = images.summary()
        if first is not None:
            raise DataError(f"{what} holds NaN or Inf values (first in image {first})")
        return
    if not images.is_floating_point():
        raise DataError(f"{what} must be floating point, got {images.dtype}")
    bad = ~torch.isfinite(images)
    if bad.any():
        first = bad.flatten(1).any(1).nonzero()[0].item()
        raise DataError(f"{what} holds NaN or Inf values (first in image {first})")

