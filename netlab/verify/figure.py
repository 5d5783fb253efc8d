"""The pieces of a lab figure (boxes, chips, labels, wires, arrows, numbered badges) in page
coordinates: what :mod:`netlab.verify.layout` computes and :mod:`netlab.verify.diagram` writes as SVG.

Kept apart from the layout so a page or a test can read a :class:`Figure` (where is hop 6's
badge? which arrows cross?) without the placement logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Hop = dict[str, Any]
ChipKey = tuple[str, str]  # (netns, iface) or (netns, "listen:<port>")
Place = Literal["pod-edge", "pod-inner", "host-top", "host-bottom", "fabric"]

MONO = 6.7  # px per character of the 11 px monospace font the chips use
SANS = 6.9  # generous average for the 12 px sans-serif titles
CHIP_H = 20.0


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    def overlaps(self, o: Rect, pad: float = 0.0) -> bool:
        return not (self.right + pad <= o.x or o.right + pad <= self.x
                    or self.bottom + pad <= o.y or o.bottom + pad <= self.y)


@dataclass
class Chip:
    """An interface or listener: a small labelled box on (or in) the box of its namespace."""

    key: ChipKey
    label: str
    place: Place
    kind: Literal["iface", "tunnel", "listener", "lo", "uplink", "port"]
    tip: str
    rect: Rect = Rect(0, 0, 0, 0)

    @property
    def width(self) -> float:
        return len(self.label) * MONO + 12


@dataclass
class Box:
    kind: Literal["node", "pod", "host", "fabric", "service", "legend"]
    rect: Rect
    fill: str
    ref: str = ""
    tip: str = ""


@dataclass
class Label:
    text: str
    x: float
    y: float  # baseline
    size: float = 11.0
    bold: bool = False
    anchor: Literal["start", "middle", "end"] = "start"
    cls: str = "t"
    mono: bool = False

    @property
    def rect(self) -> Rect:
        w = len(self.text) * (MONO if self.mono else SANS) * self.size / (11.0 if self.mono else 12.0)
        x = self.x - (w / 2 if self.anchor == "middle" else w if self.anchor == "end" else 0)
        return Rect(x, self.y - self.size, w, self.size * 1.3)


@dataclass
class Wire:
    points: list[tuple[float, float]]
    kind: Literal["veth", "tunnel", "uplink"]


@dataclass
class Arrow:
    """The arrow into hop ``n`` from the previous hop drawn at another place."""

    n: int
    points: list[tuple[float, float]]
    encap: bool


@dataclass
class Badge:
    n: int
    text: str
    rect: Rect
    matched: bool
    chip: ChipKey


@dataclass
class Figure:
    width: float
    height: float
    title: str
    boxes: list[Box] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    chips: dict[ChipKey, Chip] = field(default_factory=dict)
    wires: list[Wire] = field(default_factory=list)
    arrows: list[Arrow] = field(default_factory=list)
    badges: list[Badge] = field(default_factory=list)
    anchors: dict[int, ChipKey] = field(default_factory=dict)  # hop n -> chip it was seen at
    hops: list[Hop] = field(default_factory=list)


__all__ = ["CHIP_H", "MONO", "SANS", "Arrow", "Badge", "Box", "Chip", "ChipKey", "Figure", "Hop", "Label", "Place",
           "Rect", "Wire"]
