"""Typed results of the tasks: what the JSON lines carry (DESIGN §5), the terminal shows and the drawing uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Box = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]


@dataclass
class Entity:
    """A phrase of `text` linked to one or more boxes (normalized 0..1 and in pixels of the original image)."""

    phrase: str
    span: tuple[int, int]
    boxes: list[Box]
    boxes_px: list[PixelBox]
    # Per box: the probability the model gave its two location tokens (their product); 1.0 for a box that
    # came from the prompt; None where the tokens are not known (text made by hand).
    scores: list[float | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phrase": self.phrase,
            "span": list(self.span),
            "boxes": [list(b) for b in self.boxes],
            "scores": [None if s is None else float(f"{s:.6g}") for s in self.scores],
            "boxes_px": [list(b) for b in self.boxes_px],
        }


@dataclass
class Result:
    """One image, one task. `text` is what a person reads; spans index into it; `raw` keeps the tags."""

    image: str
    width: int
    height: int
    task: str
    prompt: str
    text: str
    entities: list[Entity]
    raw: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "task": self.task,
            "prompt": self.prompt,
            "text": self.text,
            "entities": [e.to_dict() for e in self.entities],
            "raw": self.raw,
            **self.extra,
        }


@dataclass
class Failure:
    """An input that could not be processed: the batch goes on, and the record says why."""

    image: str
    error: str
    task: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.image, "error": self.error}
        if self.task:
            out["task"] = self.task
        return out


def to_pixels(box: Box, width: int, height: int) -> PixelBox:
    """A normalized box in pixels of a width x height image, clamped to the image."""
    x1, y1, x2, y2 = box
    clamp = lambda v, hi: int(min(max(round(v), 0), hi))  # noqa: E731
    return clamp(x1 * width, width), clamp(y1 * height, height), clamp(x2 * width, width), clamp(y2 * height, height)
