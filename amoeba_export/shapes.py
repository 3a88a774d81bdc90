"""Shapes: one point (depth, width) of the trained shape space.

A shape names a subnet: `depth` = decoder layers kept, `width` = the calibrated width ratio whose
head and channel masks apply. Widths are exact floats used as keys everywhere (docs/amoeba-algorithm.md §1),
so parsing snaps a user's "0.75" or "3/4" onto the space's own value.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from .errors import UserError

# Widths closer than this are the same width (fractions like 7/8 written as floats, trained keys)
WIDTH_TOLERANCE = 1e-6


def format_width(w: float) -> str:
    """Shortest decimal that round-trips (0.875, 0.75, 1.0)."""
    return repr(float(w))


def parse_width(text: str) -> float:
    text = text.strip()
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"malformed width {text!r}: use a ratio such as 0.75 or 3/4") from None
    if not 0.0 < value <= 1.0:
        raise UserError(f"width {text!r} is out of range: it must be in (0, 1]")
    return value


@dataclass(frozen=True, order=True)
class Shape:
    depth: int
    width: float

    def __str__(self) -> str:
        return f"{self.depth}x{format_width(self.width)}"

    @classmethod
    def parse(cls, text: str) -> "Shape":
        m = re.fullmatch(r"\s*(\d+)\s*[xX@]\s*([0-9./]+)\s*", text or "")
        if not m:
            raise UserError(f"malformed shape {text!r}: write DEPTHxWIDTH, e.g. 24x0.75")
        return cls(int(m.group(1)), parse_width(m.group(2)))


@dataclass(frozen=True)
class ShapeSpace:
    depths: tuple[int, ...]
    widths: tuple[float, ...]

    def __iter__(self):
        for d in sorted(self.depths, reverse=True):
            for w in sorted(self.widths, reverse=True):
                yield Shape(d, w)

    def __len__(self) -> int:
        return len(self.depths) * len(self.widths)

    @property
    def largest(self) -> Shape:
        return Shape(max(self.depths), max(self.widths))

    @property
    def smallest(self) -> Shape:
        return Shape(min(self.depths), min(self.widths))

    def resolve(self, shape: Shape) -> Shape:
        """Snap `shape` onto the space (width by closest exact key) or say what exists."""
        width = min(self.widths, key=lambda w: abs(w - shape.width))
        if shape.depth not in self.depths or abs(width - shape.width) > WIDTH_TOLERANCE:
            raise UserError(
                f"shape {shape} is not in the calibrated space: depths "
                f"{min(self.depths)}..{max(self.depths)}, widths "
                f"{', '.join(format_width(w) for w in sorted(self.widths, reverse=True))}"
            )
        return Shape(shape.depth, width)
