"""What every step's options dataclass shares: the check each runs when it is made, and the help
of ``--device``."""

from __future__ import annotations

from ...runtime.fields import check_fields

DEVICE = "the device the members run on: cpu, cuda or cuda:N"


def post_init(self) -> None:
    """Every options dataclass's ``__post_init__``: each field's value checked against its kind."""
    check_fields(self, f"{self.step}: ")
