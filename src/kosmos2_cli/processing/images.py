"""Opening users' image files: upright, fully decoded, and with a one-line reason when that is impossible."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Twice Pillow's default warning threshold, i.e. the size at which Pillow itself refuses an image by default
# (about 179 megapixels, e.g. 13,000 x 13,000): far beyond photos, small enough to stop decompression bombs.
MAX_IMAGE_PIXELS = 2 * 89_478_485

# Modes the image processor converts to RGB itself (transparency included); others are converted here.
_PROCESSOR_MODES = frozenset(
    ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16",
     "I;16L", "I;16B", "I;16N", "F"]
)


class ImageLoadError(ValueError):
    """An image file that cannot be used; the message names the file and says why, on one line."""


def load_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Open an image file, fully decoded and turned upright by its EXIF orientation.

    Raises ImageLoadError for a missing file, a directory, a file that is not an image, a truncated or corrupt
    image, or one larger than `max_pixels` (default MAX_IMAGE_PIXELS). Only the first frame of animations and
    multi-page files is used.
    """
    name = os.fspath(path)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    file = Path(name)
    if not file.exists():
        raise ImageLoadError(f"{name}: no such file")
    if file.is_dir():
        raise ImageLoadError(f"{name}: is a directory, not an image file")
    try:
        with open(file, "rb") as handle:
            if file.stat().st_size == 0:
                raise ImageLoadError(f"{name}: empty file, not an image")
            image = _decode(handle, name, limit)
    except ImageLoadError:
        raise
    except PermissionError as err:
        raise ImageLoadError(f"{name}: cannot read the file (permission denied)") from err
    except OSError as err:
        raise ImageLoadError(f"{name}: cannot read the file ({_reason(err)})") from err
    return _convert(image, name)


def load_image_bytes(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """`load_image` for an image that arrived as bytes (an upload): the same checks and messages, `name` being
    only the label they carry (nothing is read from or written to disk)."""
    import io

    if not data:
        raise ImageLoadError(f"{name}: empty file, not an image")
    image = _decode(io.BytesIO(data), name, MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
    return _convert(image, name)


def _decode(handle, name: str, limit: int) -> Image.Image:
    """Open, check the size of, fully decode and turn upright the image in `handle`."""
    try:
        with warnings.catch_warnings():
            # Size is judged below against our own limit; Pillow's lower warning threshold would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
        width, height = image.size
        if width * height > limit:
            raise ImageLoadError(
                f"{name}: image too large ({width} x {height} = {width * height:,} pixels; the limit is "
                f"{limit:,}), refusing it as a possible decompression bomb"
            )
        try:
            image.load()
        except Exception as err:
            raise ImageLoadError(f"{name}: truncated or corrupt image ({_reason(err)})") from err
        return _upright(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{name}: not an image file (cannot identify image format)") from err
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"{name}: image too large, refusing it as a possible decompression bomb") from err
    except PermissionError as err:
        raise ImageLoadError(f"{name}: cannot read the file (permission denied)") from err
    except Exception as err:  # Pillow's plugins raise assorted errors (OSError, SyntaxError...) on bad data
        raise ImageLoadError(f"{name}: truncated or corrupt image ({_reason(err)})") from err


def _convert(image: Image.Image, name: str) -> Image.Image:
    """Modes the image processor does not take, converted to RGB (RGBA when there is transparency)."""
    if image.mode not in _PROCESSOR_MODES:
        try:
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
        except Exception as err:
            raise ImageLoadError(f"{name}: unsupported image mode {image.mode!r} ({_reason(err)})") from err
    return image


def _upright(image: Image.Image) -> Image.Image:
    """The image as it should be seen; an unreadable EXIF block leaves it as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image.copy()


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
