"""Class labels for a conditional prior, made from a dataset's attribute vectors.

The prior conditions on one class token, but face datasets label several attributes per image (the
synthetic faces: smiling, glasses, beard, hair colour, ...). A conditional prior therefore picks some of
them; every combination of their values is one class, numbered in mixed radix with the first attribute
most significant. ``["smiling", "glasses"]`` (2 x 2 values) gives four classes::

    0: smiling=0,glasses=0   1: smiling=0,glasses=1   2: smiling=1,glasses=0   3: smiling=1,glasses=1

An empty choice means an unconditional prior (0 classes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttributeClasses:
    """The map from attribute vectors to class ids.

    Attributes:
        attributes: the chosen attribute names, most significant first.
        positions: where each sits in the dataset's label vector.
        sizes: how many values each takes.
    """

    attributes: tuple[str, ...]
    positions: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def from_names(
        cls, class_attributes: Sequence[str], attribute_names: Sequence[str], num_classes_per_attribute: Sequence[int]
    ) -> "AttributeClasses":
        """Check the chosen attributes against the dataset's and build the map.

        Raises:
            ValueError: an attribute the dataset does not label, or one chosen twice.
        """
        chosen = list(class_attributes)
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"class_attributes lists an attribute twice: {chosen}")
        unknown = [name for name in chosen if name not in attribute_names]
        if unknown:
            raise ValueError(
                f"class_attributes {unknown} are not labelled in this dataset; it labels {list(attribute_names)}"
            )
        positions = tuple(list(attribute_names).index(name) for name in chosen)
        return cls(tuple(chosen), positions, tuple(int(num_classes_per_attribute[p]) for p in positions))

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when no attribute is chosen: unconditional)."""
        return math.prod(self.sizes) if self.attributes else 0

    def class_ids(self, labels: Tensor) -> Tensor:
        """Attribute vectors ``long [N, A]`` -> class ids ``long [N]``.

        All ``-1`` (the null token) when no attribute is chosen (unconditional).
        """
        if not self.attributes:
            return torch.full((labels.shape[0],), -1, dtype=torch.long, device=labels.device)
        ids = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
        for position, size in zip(self.positions, self.sizes):
            ids = ids * size + labels[:, position].long()
        return ids

    def class_names(self) -> list[str]:
        """A readable name per class id, e.g. ``"smiling=1,glasses=0"``."""
        names = []
        for class_id in range(self.num_classes):
            values = []
            for size in reversed(self.sizes):
                values.append(class_id % size)
                class_id //= size
            names.append(",".join(f"{a}={v}" for a, v in zip(self.attributes, reversed(values))))
        return names
