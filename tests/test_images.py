"""load_image: upright, fully decoded images, and one-line errors naming the file for everything else."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kosmos2_cli.processing import images
from kosmos2_cli.processing.images import ImageLoadError, load_image


def _photo(width: int = 64, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _error(path) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    assert isinstance(info.value, ValueError)
    return message


def test_loads_png_and_jpeg(tmp_path):
    for fmt, name in [("PNG", "a.png"), ("JPEG", "b.jpg")]:
        path = tmp_path / name
        path.write_bytes(_bytes(_photo(), fmt))
        image = load_image(path)
        assert image.size == (64, 40) and image.mode == "RGB"
        assert image.getpixel((0, 0)) is not None


def test_keeps_alpha_for_the_processor(tmp_path):
    path = tmp_path / "alpha.png"
    _photo().convert("RGBA").save(path)
    assert load_image(str(path)).mode == "RGBA"


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_bytes(_photo(64, 40), "JPEG", exif=exif.tobytes()))
    assert Image.open(path).size == (64, 40)
    assert load_image(path).size == (40, 64)


def test_missing_file(tmp_path):
    assert _error(tmp_path / "nope.jpg").endswith("nope.jpg: no such file")


def test_directory(tmp_path):
    assert "is a directory" in _error(tmp_path)


def test_not_an_image(tmp_path):
    path = tmp_path / "snow.jpg"
    path.write_text("this is text, not a JPEG\n" * 10)
    assert _error(path) == f"{path}: not an image file (cannot identify image format)"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert "empty file" in _error(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    data = _bytes(_photo(256, 256), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _error(path)


def test_corrupt_png_data(tmp_path):
    data = bytearray(_bytes(_photo(128, 128), "PNG"))
    start = data.index(b"IDAT") + 20
    data[start : start + 200] = b"\x00" * 200
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    message = _error(path)
    assert "corrupt" in message


def test_decompression_bomb_by_header(tmp_path):
    """A tiny PNG whose header claims 100,000 x 100,000 pixels is refused before any decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    message = _error(path)
    assert "too large" in message and "decompression bomb" in message


def test_decompression_bomb_by_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    _photo(64, 40).save(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    assert "64 x 40" in _error(path)
    assert load_image(path, max_pixels=64 * 40).size == (64, 40)


def test_first_frame_of_animation(tmp_path):
    frames = [Image.new("RGB", (20, 10), color) for color in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = load_image(path)
    assert image.size == (20, 10)
    assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_sixteen_bit_png_loads(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.arange(200, dtype=np.uint16).reshape(10, 20) * 300).save(path)
    assert load_image(path).mode in ("I;16", "I")
