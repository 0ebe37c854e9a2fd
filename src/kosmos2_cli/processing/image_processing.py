"""Kosmos-2's image preprocessing: the reference's CLIP image processor (PIL backend), step for step.

Released settings: convert to RGB (transparency composited onto white), resize to 224 x 224 with Pillow's
bicubic filter (not aspect-preserving: `use_square_size`), centre crop 224 (a no-op then), multiply by 1/255 in
float64 and cast to float32, normalize with CLIP's mean and std in float32. The arithmetic is done in the same
precision and order as the reference, so the pixel values agree to float32 rounding.

Where the reference gives a broken result or fails, we do the sensible thing instead (see `to_rgb`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kosmos2_cli.model.config import read_json_object

PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DEFAULT_SIZE = 224
_RESAMPLING = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image the way the reference makes one, transparency composited onto white.

    The reference (transformers' `convert_to_rgb`) composites when the image has an "A" band or a
    `transparency` entry, else calls `convert("RGB")`. Differences, each where the reference is wrong:
    - 16-bit grayscale ("I;16*", and "I" holding values above 255): Pillow's conversion clips at 255, which turns
      a 16-bit photo almost white; we scale 0..65535 to 0..255 (rounded) instead. "I" images within 0..255 are
      8-bit data in a wide mode and convert exactly as in the reference.
    - "La" (premultiplied luminance + alpha): Pillow cannot convert it to RGB(A), the reference raises; we go
      through "LA".
    - "LAB": its "A" band is the a* colour axis, not alpha; the reference composites with it as if it were. We
      convert the colours.
    """
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and _max_value(image) > 255):
        image = _sixteen_bit_to_l(image)
    elif image.mode == "La":
        image = image.convert("LA")
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    has_alpha = ("A" in image.getbands() and image.mode != "LAB") or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _max_value(image: Image.Image) -> int:
    extrema = image.getextrema()
    return int(extrema[1]) if extrema else 0


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit "L" (keeping a `transparency` value as an alpha band)."""
    values = np.asarray(image).astype(np.float64)
    eight = Image.fromarray(np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8), mode="L")
    transparency = image.info.get("transparency")
    if isinstance(transparency, int):
        alpha = np.where(np.asarray(image) == transparency, 0, 255).astype(np.uint8)
        return Image.merge("LA", (eight, Image.fromarray(alpha, mode="L")))
    return eight


class Kosmos2ImageProcessor:
    """Images to `pixel_values` (N, 3, 224, 224) float32, equal to the reference's within float32 rounding."""

    model_input_names = ("pixel_values",)

    def __init__(
        self,
        do_resize: bool = True,
        size: int | Sequence[int] | dict[str, int] | None = None,
        resample: int = 3,
        do_center_crop: bool = True,
        crop_size: int | Sequence[int] | dict[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = CLIP_MEAN,
        image_std: float | Sequence[float] = CLIP_STD,
        do_convert_rgb: bool = True,
        use_square_size: bool = False,
    ):
        """Settings as in a `preprocessor_config.json`; with no arguments, the released model's.

        `size` is {"height", "width"} (exact), {"shortest_edge"} (aspect kept) or an int (shortest edge).
        `use_square_size` (the released config sets it) turns a shortest edge S into an S x S resize. (The reference
        always uses 224 there whatever the configured edge; we use the configured edge.)
        """
        if size is None:
            size = {"height": _DEFAULT_SIZE, "width": _DEFAULT_SIZE}
        self.size = _size_dict(size, "size", square=False)
        if use_square_size and "shortest_edge" in self.size:
            edge = self.size["shortest_edge"]
            self.size = {"height": edge, "width": edge}
        self.crop_size = _size_dict(_DEFAULT_SIZE if crop_size is None else crop_size, "crop_size", square=True)
        if int(resample) not in _RESAMPLING:
            raise ValueError(f"resample must be one of Pillow's filters {sorted(_RESAMPLING)}, got {resample!r}")
        self.resample = int(resample)
        self.do_resize, self.do_center_crop = bool(do_resize), bool(do_center_crop)
        self.do_rescale, self.rescale_factor = bool(do_rescale), float(rescale_factor)
        self.do_normalize, self.do_convert_rgb = bool(do_normalize), bool(do_convert_rgb)
        self.image_mean = _three(image_mean, "image_mean")
        self.image_std = _three(image_std, "image_std")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Kosmos2ImageProcessor:
        """From the contents of a `preprocessor_config.json` (unknown keys are ignored)."""
        known = (
            "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb", "use_square_size",
        )
        settings = {key: config[key] for key in known if config.get(key) is not None}
        # The reference's class default is a 224 shortest edge; a config without `size` means that.
        settings.setdefault("size", {"shortest_edge": _DEFAULT_SIZE})
        return cls(**settings)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Kosmos2ImageProcessor:
        """From a model folder: its `preprocessor_config.json` if there is one, else the released settings."""
        path = Path(folder) / PREPROCESSOR_CONFIG_FILE
        if not path.is_file():
            return cls()
        return cls.from_dict(read_json_object(path, "cannot read the image settings", "expected a JSON object"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "do_resize": self.do_resize, "size": dict(self.size), "resample": self.resample,
            "do_center_crop": self.do_center_crop, "crop_size": dict(self.crop_size), "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    def __call__(self, images: Any, return_tensors: str | None = None) -> dict[str, Any]:
        """`{"pixel_values": ...}` for one image or a list: a list of (3, H, W) arrays, or a "np"/"pt" batch."""
        batch = [self.preprocess_one(image) for image in _flatten(images)]
        if return_tensors is None:
            pixel_values: Any = batch
        elif return_tensors == "np":
            pixel_values = np.stack(batch) if batch else np.zeros((0, 3, 0, 0), np.float32)
        elif return_tensors == "pt":
            import torch

            pixel_values = torch.from_numpy(np.stack(batch)) if batch else torch.zeros((0, 3, 0, 0))
        else:
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")
        return {"pixel_values": pixel_values}

    preprocess = __call__

    def preprocess_one(self, image: Any) -> np.ndarray:
        """One image (PIL image, uint8 array HWC/CHW/HW, or a path) to a (3, H, W) array.

        A path is opened with `load_image` (EXIF orientation applied) and then treated like any PIL image, so its
        transparency is composited onto white; the reference's path loader drops alpha instead.
        """
        return np.ascontiguousarray(self._values(self._resized_hwc(image)).transpose(2, 0, 1))

    def resized(self, image: Any) -> np.ndarray:
        """`preprocess_one` up to its arithmetic: the converted, resized and cropped picture, (3, H, W) uint8.

        A quarter of the float pixels' bytes, for preparation in other processes; `lookup_table` turns it into
        exactly `preprocess_one`'s values (every value is a function of one byte and its channel)."""
        return np.ascontiguousarray(self._resized_hwc(image).transpose(2, 0, 1))

    def lookup_table(self) -> np.ndarray:
        """(3, 256): what `preprocess_one` makes of each byte value in each channel, by its own arithmetic."""
        every = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # a 1 x 256 picture, HWC
        return np.ascontiguousarray(self._values(every)[0].T)

    def _resized_hwc(self, image: Any) -> np.ndarray:
        pil = self._as_rgb_image(image)
        if self.do_resize:
            height, width = self._resize_target(pil.height, pil.width)
            pil = pil.resize((width, height), resample=Image.Resampling[_RESAMPLING[self.resample]])
        pixels = np.asarray(pil)
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return pixels

    def _values(self, pixels: np.ndarray) -> np.ndarray:
        """Rescale and normalize uint8 HWC pixels in the reference's precision and order."""
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(pixels.dtype, np.floating):
                pixels = pixels.astype(np.float32)
            mean = np.array(self.image_mean, dtype=pixels.dtype)
            std = np.array(self.image_std, dtype=pixels.dtype)
            pixels = (pixels - mean) / std
        return pixels

    def _as_rgb_image(self, image: Any) -> Image.Image:
        if isinstance(image, (str, Path)):
            from kosmos2_cli.processing.images import load_image

            image = load_image(image)
        if isinstance(image, Image.Image):
            if not self.do_convert_rgb:
                if image.mode != "RGB":
                    raise ValueError(f"do_convert_rgb is off, so images must be RGB; got mode {image.mode!r}")
                return image
            return to_rgb(image)
        return Image.fromarray(_array_to_rgb(image), mode="RGB")

    def _resize_target(self, height: int, width: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        edge = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        return (new_long, edge) if width <= height else (edge, new_long)


def _array_to_rgb(array: Any) -> np.ndarray:
    """A uint8 image array (HW, HWC or CHW with 1, 3 or 4 channels; numpy or torch) as HWC RGB, like the reference.

    Four channels are RGBA, composited onto white with the reference's float64 arithmetic and rounding.
    """
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    if not isinstance(array, np.ndarray):
        raise TypeError(f"images must be PIL images, uint8 arrays or paths; got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (0..255), got {array.dtype}; convert to a PIL image first")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"an image array must have 2 or 3 dimensions, got shape {array.shape}")
    if array.shape[0] in (1, 3, 4):  # channels first wins when both ends could be channels, as in the reference
        array = np.moveaxis(array, 0, -1)
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 3:
        return np.ascontiguousarray(array)
    if channels == 4:
        alpha = array[..., 3:4] / 255
        composite = alpha * array[..., :3] + (1 - alpha) * 255
        return np.round(composite).astype(np.uint8)
    raise ValueError(f"an image array must have 1, 3 or 4 channels, got shape {array.shape}")


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of an HWC array, zero-padding where the image is smaller, as the reference does."""
    orig_h, orig_w = pixels.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0 and top + height <= orig_h and left + width <= orig_w:
        return pixels[top : top + height, left : left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    pad_top, pad_left = -(-(new_h - orig_h) // 2), -(-(new_w - orig_w) // 2)
    padded[pad_top : pad_top + orig_h, pad_left : pad_left + orig_w] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def _size_dict(size: Any, name: str, square: bool) -> dict[str, int]:
    if isinstance(size, int):
        return {"height": size, "width": size} if square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        if size.get("height") is not None and size.get("width") is not None:
            return {"height": int(size["height"]), "width": int(size["width"])}
        if size.get("shortest_edge") is not None and not square and size.get("longest_edge") is None:
            return {"shortest_edge": int(size["shortest_edge"])}
    raise ValueError(
        f"{name} must be an int, (height, width), {{'height', 'width'}}"
        + ("" if square else " or {'shortest_edge'}")
        + f"; got {size!r}"
    )


def _three(values: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(values)}")
    return values  # type: ignore[return-value]


def _flatten(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return [item for sub in images for item in _flatten(sub)]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if hasattr(images, "detach") and images.ndim == 4:
        return list(images)
    return [images]
