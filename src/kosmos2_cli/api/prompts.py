"""The task prompts of the model card (DESIGN §4) and the boxes that `refer` puts into them."""

from __future__ import annotations

import math

GRID = 32  # the image is cut into GRID x GRID cells; a box is its top-left and bottom-right cell

CAPTION = "<grounding> An image of"
DETAILED = "<grounding> Describe this image in detail:"
TASKS = ("caption", "ground", "refer", "ask")


class PromptError(ValueError):
    """A task argument that cannot become a prompt (empty phrase, bad box...)."""

    def __init__(self, message: str, advice: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice  # what the caller can change, as a word the front end turns into its own terms


def caption_prompt(detailed: bool = False) -> str:
    return DETAILED if detailed else CAPTION


def ground_prompt(phrase: str) -> str:
    phrase = _clean(phrase, "phrase")
    return f"<grounding><phrase> {phrase}</phrase>"


def ask_prompt(question: str) -> str:
    question = _clean(question, "question")
    return f"<grounding> Question: {question} Answer:"


def refer_prompt(cells: tuple[int, int]) -> str:
    first, last = cells
    return f"<grounding><phrase> It</phrase><object>{patch_token(first)}{patch_token(last)}</object> is"


def patch_token(index: int) -> str:
    return f"<patch_index_{index:04d}>"


def _clean(value: str, what: str) -> str:
    value = " ".join(value.split())
    if not value:
        raise PromptError(f"the {what} is empty")
    if "<" in value and ">" in value:
        raise PromptError(f"the {what} must not contain tags like <phrase>: {value!r}")
    return value


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'x1,y1,x2,y2' (commas or spaces) as four numbers."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError as err:
        raise PromptError(f"box {text!r} must be four numbers x1,y1,x2,y2") from err
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        raise PromptError(f"box {text!r} must be four numbers x1,y1,x2,y2")
    return numbers  # type: ignore[return-value]


def normalize_box(
    box: tuple[float, float, float, float], width: int, height: int, normalized: bool = False
) -> tuple[float, float, float, float]:
    """Validate a box (pixels of the image, or 0..1 with `normalized`) and return it normalized to 0..1."""
    x1, y1, x2, y2 = box
    if not (x1 < x2 and y1 < y2):
        raise PromptError(f"box {_fmt(box)} needs x1 < x2 and y1 < y2")
    limit_w, limit_h, unit = (1.0, 1.0, "0..1") if normalized else (width, height, f"the {width}x{height} image")
    if x1 < 0 or y1 < 0 or x2 > limit_w or y2 > limit_h:
        raise PromptError(f"box {_fmt(box)} is not inside {unit}")
    if normalized:
        return x1, y1, x2, y2
    return x1 / width, y1 / height, x2 / width, y2 / height


def box_to_cells(box: tuple[float, float, float, float], grid: int = GRID) -> tuple[int, int]:
    """The grid cells of a normalized box's corners, as the reference's processor computes them."""
    from kosmos2_cli.processing.postprocess import coordinate_to_patch_index

    return coordinate_to_patch_index(box, grid)


def _fmt(box) -> str:
    return ",".join(f"{v:g}" for v in box)
