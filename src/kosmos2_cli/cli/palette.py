"""The one palette of entity colours: the terminal colours a phrase and the drawing colours its box the same.

Mid-lightness, saturated colours: legible as text on dark and on light terminals, and visible as boxes on
photographs. Entity i (in the order of the record's `entities`) takes colour i, cycling.
"""

from __future__ import annotations

COLORS: tuple[str, ...] = (
    "#3b82f6",  # blue
    "#f97316",  # orange
    "#22c55e",  # green
    "#ef4444",  # red
    "#a855f7",  # purple
    "#06b6d4",  # cyan
    "#eab308",  # amber
    "#ec4899",  # pink
    "#84cc16",  # lime
    "#14b8a6",  # teal
)
REGION_COLOR = "#ffffff"  # refer's query box


def color(index: int) -> str:
    """The hex colour of entity `index`."""
    return COLORS[index % len(COLORS)]


def rgb(hex_color: str) -> tuple[int, int, int]:
    value = hex_color.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def bgr(hex_color: str) -> tuple[int, int, int]:
    """OpenCV's channel order."""
    r, g, b = rgb(hex_color)
    return b, g, r


def text_on(hex_color: str) -> tuple[int, int, int]:
    """Black or white (RGB), whichever reads better on `hex_color` (WCAG relative luminance)."""

    def linear(c: int) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgb(hex_color))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)
