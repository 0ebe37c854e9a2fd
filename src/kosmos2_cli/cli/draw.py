"""Drawing a result on its image with OpenCV: boxes and labels in the palette's colours, at the image's full size.

Line widths and text scale with the image, so the same drawing reads on a 300 px thumbnail and on a 4000 px
photo. Labels sit above their box (inside it when there is no room), kept inside the picture and moved down
when they would cover an earlier label.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from kosmos2_cli.api.results import Result
from kosmos2_cli.cli import palette

WRITABLE = {".png": [cv2.IMWRITE_PNG_COMPRESSION, 3], ".jpg": [cv2.IMWRITE_JPEG_QUALITY, 95],
            ".jpeg": [cv2.IMWRITE_JPEG_QUALITY, 95], ".webp": [cv2.IMWRITE_WEBP_QUALITY, 95], ".bmp": [],
            ".tif": [], ".tiff": []}
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_UNICODE_TEXT = int(cv2.__version__.split(".")[0]) >= 5


class DrawError(ValueError):
    """A drawing that cannot be written (unknown format, unwritable place)."""


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """The path, if its extension names a format we write; raises DrawError otherwise."""
    out = Path(path)
    if out.suffix.lower() not in WRITABLE:
        raise DrawError(f"{out}: cannot write a drawing in this format (use {', '.join(sorted(WRITABLE))})")
    return out


def annotated_path(folder: str | os.PathLike[str], name: str) -> Path:
    """Where `--annotate-dir` puts the drawing of image `name`: the same relative path under `folder` (the file
    name alone for absolute paths or ones reaching outside with ".."); formats OpenCV cannot write get ".png"
    appended."""
    source = Path(name)
    relative = Path(source.name) if source.is_absolute() or ".." in source.parts else source
    if source.suffix.lower() not in WRITABLE:
        relative = relative.with_name(relative.name + ".png")
    return Path(folder) / relative


def annotate(image: Image.Image, result: Result) -> np.ndarray:
    """The image as RGB uint8 (H, W, 3) with the result's boxes and labels drawn on it."""
    from kosmos2_cli.processing.image_processing import to_rgb

    canvas = cv2.cvtColor(np.asarray(to_rgb(image)), cv2.COLOR_RGB2BGR).copy()
    style = _Style.for_size(*canvas.shape[1::-1])
    placed: list[tuple[int, int, int, int]] = []
    region = result.extra.get("box_px") if result.task == "refer" else None
    if region:
        _dashed_rect(canvas, region, palette.REGION_COLOR, style)
        _label(canvas, "region", region, palette.REGION_COLOR, style, placed)
    for index, entity in enumerate(result.entities):
        color = palette.color(index)
        for box in entity.boxes_px:
            _rect(canvas, box, color, style)
    for index, entity in enumerate(result.entities):
        for box in entity.boxes_px:
            _label(canvas, entity.phrase, box, palette.color(index), style, placed)
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)


def save_annotated(image: Image.Image, result: Result, path: str | os.PathLike[str]) -> Path:
    """Draw and write atomically (a temp file renamed into place), creating the folder; returns the path."""
    out = check_output_path(path)
    drawn = cv2.cvtColor(annotate(image, result), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(out.suffix.lower(), drawn, WRITABLE[out.suffix.lower()])
    if not ok:
        raise DrawError(f"{out}: OpenCV could not encode the drawing")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        temp.write_bytes(data.tobytes())
        os.replace(temp, out)
    except OSError as err:
        raise DrawError(f"{out}: cannot write the drawing ({err.strerror or err})") from err
    return out


class _Style:
    """Sizes for one image: line thickness, font scale and padding grow with the longer side."""

    def __init__(self, line: int, scale: float, text: int, pad: int) -> None:
        self.line, self.scale, self.text, self.pad = line, scale, text, pad

    @classmethod
    def for_size(cls, width: int, height: int) -> _Style:
        side = max(width, height)
        line = max(2, round(side / 350))
        text_height = max(12.0, side * 0.022)  # cap height in pixels
        (_, unit), _ = cv2.getTextSize("Ag", _FONT, 1.0, 1)
        scale = text_height / unit
        return cls(line, scale, max(1, round(scale * 1.4)), max(3, round(text_height * 0.35)))


def _rect(canvas: np.ndarray, box, color: str, style: _Style) -> None:
    x1, y1, x2, y2 = _clip(box, canvas)
    cv2.rectangle(canvas, (x1, y1), (x2, y2), palette.bgr(color), style.line, cv2.LINE_AA)


def _dashed_rect(canvas: np.ndarray, box, color: str, style: _Style) -> None:
    x1, y1, x2, y2 = _clip(box, canvas)
    dash = max(6, style.line * 4)
    edges = [((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))]
    for width, col in ((style.line + 2, (0, 0, 0)), (style.line, palette.bgr(color))):
        for (ax, ay), (bx, by) in edges:
            length = max(abs(bx - ax), abs(by - ay))
            for start in range(0, length, dash * 2):
                end = min(start + dash, length)
                p = (ax + (bx - ax) * start // max(length, 1), ay + (by - ay) * start // max(length, 1))
                q = (ax + (bx - ax) * end // max(length, 1), ay + (by - ay) * end // max(length, 1))
                cv2.line(canvas, p, q, col, width, cv2.LINE_AA)


def _label(canvas: np.ndarray, text: str, box, color: str, style: _Style,
           placed: list[tuple[int, int, int, int]]) -> None:
    text = _printable(text) or "?"
    height, width = canvas.shape[:2]
    (tw, th), base = cv2.getTextSize(text, _FONT, style.scale, style.text)
    lw, lh = tw + 2 * style.pad, th + base + 2 * style.pad
    x1, y1, x2, y2 = _clip(box, canvas)
    left = min(max(x1 - style.line // 2, 0), max(width - lw, 0))
    top = y1 - lh if y1 - lh >= 0 else y1  # above the box, else inside its top edge
    top = min(top, max(height - lh, 0))
    for _ in range(len(placed) + 1):  # move down past labels already drawn
        clash = next((p for p in placed if _overlap((left, top, left + lw, top + lh), p)), None)
        if clash is None:
            break
        top = min(clash[3], max(height - lh, 0))
        if top == clash[1]:
            break
    placed.append((left, top, left + lw, top + lh))
    cv2.rectangle(canvas, (left, top), (left + lw, top + lh), palette.bgr(color), cv2.FILLED)
    ink = palette.text_on(color)[::-1]
    cv2.putText(canvas, text, (left + style.pad, top + style.pad + th), _FONT, style.scale, ink, style.text,
                cv2.LINE_AA)


def _clip(box, canvas: np.ndarray) -> tuple[int, int, int, int]:
    height, width = canvas.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return (min(max(x1, 0), width - 1), min(max(y1, 0), height - 1), min(max(x2, 0), width - 1),
            min(max(y2, 0), height - 1))


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _printable(text: str) -> str:
    """The label as OpenCV can write it: OpenCV 5 draws Unicode; before it, the Hershey fonts have ASCII only, so
    accents are dropped and other letters become '?'."""
    if _UNICODE_TEXT:
        return " ".join(text.split())
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in kept).strip()
