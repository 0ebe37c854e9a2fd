"""Drawing results: boxes in the palette's colours at full size, labels, sizes that scale, every image mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kosmos2_cli.api.results import Entity, Result
from kosmos2_cli.cli import palette
from kosmos2_cli.cli.draw import DrawError, annotate, annotated_path, save_annotated

GRAY = (128, 128, 128)


def _result(width, height, boxes_px, task="caption", extra=None) -> Result:
    entities = [Entity(f"thing {i}", (0, 1), [(0, 0, 1, 1)], [box]) for i, box in enumerate(boxes_px)]
    return Result("x.png", width, height, task, "", "", entities, "", extra or {})


def _is(pixel, hex_color, tolerance=40) -> bool:
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, palette.rgb(hex_color), strict=True))


def _edge_width(drawn: np.ndarray, x: int, y: int, hex_color: str) -> int:
    """How many pixels of `hex_color` run horizontally through (x, y)."""
    row = drawn[y]
    return sum(_is(row[i], hex_color) for i in range(max(0, x - 60), min(len(row), x + 60)))


def test_boxes_in_palette_colours_at_full_size():
    image = Image.new("RGB", (300, 200), GRAY)
    drawn = annotate(image, _result(300, 200, [(30, 60, 200, 180), (220, 100, 290, 190)]))
    assert drawn.shape == (200, 300, 3) and drawn.dtype == np.uint8
    assert _is(drawn[120, 30], palette.color(0))  # left edge of the first box
    assert _is(drawn[120, 200], palette.color(0))  # right edge
    assert _is(drawn[180, 100], palette.color(0))  # bottom edge
    assert _is(drawn[150, 290], palette.color(1))  # second box, second colour
    assert tuple(drawn[120, 115]) == GRAY  # boxes are not filled
    assert tuple(drawn[5, 5]) == GRAY  # the rest of the picture is untouched


def test_label_above_its_box_in_its_colour_with_readable_ink():
    image = Image.new("RGB", (300, 200), GRAY)
    drawn = annotate(image, _result(300, 200, [(30, 60, 200, 180)]))
    label = drawn[35:58, 30:90]  # above the box's top-left corner
    colours = label.reshape(-1, 3)
    share = np.mean([_is(p, palette.color(0), 10) for p in colours])
    assert share > 0.4  # the label's background
    ink = palette.text_on(palette.color(0))
    assert any(all(abs(int(a) - b) < 60 for a, b in zip(p, ink, strict=True)) for p in colours)  # its text


def test_label_goes_inside_when_the_box_touches_the_top():
    image = Image.new("RGB", (300, 200), GRAY)
    drawn = annotate(image, _result(300, 200, [(0, 0, 150, 150)]))
    assert np.mean([_is(p, palette.color(0), 10) for p in drawn[3:15, 5:40].reshape(-1, 3)]) > 0.4


def test_lines_and_text_scale_with_the_image():
    small = annotate(Image.new("RGB", (300, 200), GRAY), _result(300, 200, [(30, 30, 200, 180)]))
    big = annotate(Image.new("RGB", (4000, 3000), GRAY), _result(4000, 3000, [(400, 600, 3000, 2800)]))
    thin = _edge_width(small, 30, 100, palette.color(0))
    thick = _edge_width(big, 400, 1500, palette.color(0))
    assert 2 <= thin <= 4 and thick >= 8
    label_rows = lambda d, x, top: sum(_is(d[y, x + 3], palette.color(0), 10) for y in range(0, top))  # noqa: E731
    assert label_rows(big, 400, 600) > 4 * label_rows(small, 30, 30)


def test_refer_region_is_drawn_dashed():
    image = Image.new("RGB", (300, 200), GRAY)
    drawn = annotate(image, _result(300, 200, [], task="refer", extra={"box_px": [50, 50, 250, 150]}))
    top = drawn[50, 60:240]
    white = [bool((p > 230).all()) for p in top]
    assert any(white) and not all(white)  # dashes


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK", "I;16", "1"])
def test_every_image_mode(mode):
    image = Image.new("RGB", (64, 48), GRAY).convert(mode) if mode != "I;16" else Image.fromarray(
        np.full((48, 64), 30000, dtype=np.uint16))
    drawn = annotate(image, _result(64, 48, [(5, 5, 40, 40)]))
    assert drawn.shape == (48, 64, 3)
    assert _is(drawn[20, 5], palette.color(0))


def test_save_png_is_exact_and_atomic(tmp_path):
    image = Image.new("RGB", (120, 80), GRAY)
    result = _result(120, 80, [(10, 20, 100, 70)])
    path = save_annotated(image, result, tmp_path / "new" / "out.png")
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), annotate(image, result))
    assert [p.name for p in path.parent.iterdir()] == ["out.png"]
    jpg = save_annotated(image, result, tmp_path / "out.JPG")
    assert Image.open(jpg).format == "JPEG" and Image.open(jpg).size == (120, 80)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(DrawError, match="cannot write a drawing in this format"):
        save_annotated(Image.new("RGB", (8, 8)), _result(8, 8, []), tmp_path / "out.gif")


def test_annotated_paths_mirror_the_inputs(tmp_path):
    assert annotated_path(tmp_path, "photos/a/b.jpg") == tmp_path / "photos/a/b.jpg"
    assert annotated_path(tmp_path, "/abs/c.PNG") == tmp_path / "c.PNG"
    assert annotated_path(tmp_path, "../up/d.png") == tmp_path / "d.png"
    assert annotated_path(tmp_path, "e.gif") == tmp_path / "e.gif.png"
    assert isinstance(annotated_path(str(tmp_path), "f.jpg"), Path)


def test_palette_is_shared_and_distinct():
    assert len(set(palette.COLORS)) == len(palette.COLORS) >= 8
    assert palette.color(len(palette.COLORS)) == palette.color(0)
    assert palette.bgr("#102030") == (0x30, 0x20, 0x10)
    assert palette.text_on("#ffffff") == (0, 0, 0) and palette.text_on("#000000") == (255, 255, 255)
