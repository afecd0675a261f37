"""Colours of defect classes in overlays (BGR, for OpenCV): the same class index draws in the
same colour in the operator view, the archive's overlays and eval's overlays.

Index 0 is a one-class model's ``defect`` (red, as overlays always drew it); a multi-class
model's mask holds ``k + 1`` for class ``k`` of its card.
"""

from __future__ import annotations

CLASS_BGR: tuple[tuple[int, int, int], ...] = (
    (0, 0, 255),  # red
    (255, 160, 0),  # blue
    (0, 200, 0),  # green
    (0, 200, 255),  # amber
    (255, 0, 200),  # violet
    (200, 200, 0),  # teal
    (0, 110, 255),  # orange
    (180, 180, 180),  # grey
)


def class_bgr(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` (0-based), cycling past the palette's end."""
    return CLASS_BGR[index % len(CLASS_BGR)]
