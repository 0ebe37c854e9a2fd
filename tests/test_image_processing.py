"""Pixel values against the reference's CLIP image processor (PIL backend), for the fixtures and odd images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracle import RELEASED_PREPROCESSOR_CONFIG, fixture_images, reference_processor
from PIL import Image

from kosmos2_cli.processing.image_processing import Kosmos2ImageProcessor, to_rgb

ATOL = 1e-6


@pytest.fixture(scope="module")
def ref(shared_fixtures):
    return reference_processor().image_processor


@pytest.fixture(scope="module")
def ours():
    return Kosmos2ImageProcessor.from_dict(RELEASED_PREPROCESSOR_CONFIG)


@pytest.fixture(scope="module")
def photo(shared_fixtures):
    """A small real photo (two_dogs.jpg shrunk), the base of the odd-mode images."""
    path = next(p for p in fixture_images() if p.name == "two_dogs.jpg")
    return Image.open(path).convert("RGB").resize((120, 60), Image.Resampling.BILINEAR)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def assert_matches(ref, ours, image) -> np.ndarray:
    want = ref(image, return_tensors="np")["pixel_values"]
    got = ours(image, return_tensors="np")["pixel_values"]
    assert got.shape == want.shape == (1, 3, 224, 224) and got.dtype == want.dtype == np.float32
    assert max_diff(got, want) <= ATOL
    return got


def reference_image_processor(**settings):
    """The reference's image processor with the released settings updated by `settings` (not cached)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    skip = ("image_processor_type", "processor_class")
    config = {k: v for k, v in RELEASED_PREPROCESSOR_CONFIG.items() if k not in skip}
    return CLIPImageProcessorPil(**{**config, **settings})


def test_released_defaults():
    processor = Kosmos2ImageProcessor()
    assert processor.size == {"height": 224, "width": 224}
    assert processor.to_dict() == Kosmos2ImageProcessor.from_dict(RELEASED_PREPROCESSOR_CONFIG).to_dict()


def test_fixture_images(ref, ours):
    images = [Image.open(path) for path in fixture_images()]
    assert {im.mode for im in images} >= {"RGB", "RGBA"}
    for image in images:
        assert_matches(ref, ours, image)


def _odd_images(photo: Image.Image) -> dict[str, Image.Image]:
    rgba = photo.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(photo.size)
    rgba.putalpha(alpha)
    la = photo.convert("L").convert("LA")
    la.putalpha(alpha)
    palette_transparent = photo.convert("P")
    palette_transparent.info["transparency"] = palette_transparent.getpixel((0, 0))
    gray_transparent = photo.convert("L")
    gray_transparent.info["transparency"] = gray_transparent.getpixel((5, 5))
    rgb_transparent = photo.copy()
    rgb_transparent.info["transparency"] = photo.getpixel((3, 3))
    return {
        "RGBA": rgba,
        "LA": la,
        "L": photo.convert("L"),
        "P": photo.convert("P"),
        "P-adaptive": photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "P-transparency": palette_transparent,
        "PA": rgba.convert("PA"),
        "L-transparency": gray_transparent,
        "RGB-transparency": rgb_transparent,
        "CMYK": photo.convert("CMYK"),
        "YCbCr": photo.convert("YCbCr"),
        "HSV": photo.convert("HSV"),
        "RGBa": rgba.convert("RGBa"),
        "RGBX": photo.convert("RGBX"),
        "1": photo.convert("1"),
        "I-8bit": photo.convert("L").convert("I"),
        "F-8bit": photo.convert("L").convert("F"),
        "1x1": photo.resize((1, 1)),
        "2x1": photo.resize((2, 1)),
        "wide-3000x5": photo.resize((3000, 5)),
        "tall-5x3000": photo.resize((5, 3000)),
        "odd-225x223": photo.resize((225, 223)),
    }


def test_odd_modes_and_sizes(ref, ours, photo):
    for name, image in _odd_images(photo).items():
        try:
            assert_matches(ref, ours, image)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err


def test_odd_modes_after_a_png_round_trip(ref, ours, photo, tmp_path):
    """The same modes as Pillow gives them back from files (palette transparency from tRNS, etc.)."""
    for name, image in _odd_images(photo).items():
        if image.mode in ("CMYK", "YCbCr", "HSV", "RGBa", "RGBX", "F", "PA", "I"):
            continue  # PNG cannot store these
        path = tmp_path / f"{name}.png"
        image.save(path)
        reopened = Image.open(path)
        assert_matches(ref, ours, reopened)


def test_transparency_is_composited_on_white(ours):
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    got, want = (ours(image, return_tensors="np")["pixel_values"] for image in (clear, white))
    assert np.array_equal(got, want)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(ref, ours, photo):
    """The reference clips 16-bit values at 255 (a 16-bit photo comes out nearly white); we scale to 8 bits."""
    gray8 = np.asarray(photo.convert("L"))
    gray16 = gray8.astype(np.uint16) * 257  # the exact 16-bit version of the 8-bit image
    expected = ours(photo.convert("L"), return_tensors="np")["pixel_values"]
    sixteen = Image.fromarray(gray16)
    assert sixteen.mode == "I;16"
    big_endian = Image.fromarray(gray16.astype(">u2"))
    assert big_endian.mode == "I;16B"
    for image in (sixteen, sixteen.convert("I"), big_endian):
        got = ours(image, return_tensors="np")["pixel_values"]
        assert max_diff(got, expected) <= ATOL, image.mode
    clipped = ref(sixteen, return_tensors="np")["pixel_values"]
    assert max_diff(clipped, expected) > 0.5  # what we deliberately do not reproduce


def test_sixteen_bit_png_file(ours, photo, tmp_path):
    gray16 = np.asarray(photo.convert("L")).astype(np.uint16) * 257
    path = tmp_path / "gray16.png"
    Image.fromarray(gray16).save(path)
    reopened = Image.open(path)
    assert reopened.mode in ("I;16", "I")
    got = ours(reopened, return_tensors="np")["pixel_values"]
    assert max_diff(got, ours(photo.convert("L"), return_tensors="np")["pixel_values"]) <= ATOL


def test_la_premultiplied_and_lab(ref, ours, photo):
    """Modes the reference cannot take ("La" raises) or misreads ("LAB": its A band is not alpha)."""
    la = photo.convert("L").convert("LA")
    premultiplied = la.convert("La")
    with pytest.raises(ValueError):
        ref(premultiplied)
    got = ours(premultiplied, return_tensors="np")["pixel_values"]
    assert max_diff(got, ours(la, return_tensors="np")["pixel_values"]) <= ATOL  # opaque: same as LA
    lab = photo.convert("LAB")
    assert to_rgb(lab).mode == "RGB"
    got = ours(lab, return_tensors="np")["pixel_values"]
    assert max_diff(got, ours(lab.convert("RGB"), return_tensors="np")["pixel_values"]) <= ATOL


def test_arrays(ref, ours, photo):
    rgb = np.asarray(photo)
    rgba = np.asarray(_odd_images(photo)["RGBA"])
    gray = np.asarray(photo.convert("L"))[..., None]
    for array in (rgb, rgb.transpose(2, 0, 1), rgba, rgba.transpose(2, 0, 1), gray):
        want = ref(array, return_tensors="np")["pixel_values"]
        assert max_diff(ours(array, return_tensors="np")["pixel_values"], want) <= ATOL
    assert max_diff(ours(torch.from_numpy(rgb.copy()), return_tensors="np")["pixel_values"],
                    ref(rgb, return_tensors="np")["pixel_values"]) <= ATOL
    with pytest.raises(TypeError, match="uint8"):
        ours(rgb.astype(np.float32))


def test_paths_are_loaded_upright(ours, photo, tmp_path):
    path = tmp_path / "photo.png"
    photo.save(path)
    assert np.array_equal(ours(path)["pixel_values"][0], ours(photo)["pixel_values"][0])
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise to view
    rotated = tmp_path / "rotated.jpg"
    photo.save(rotated, exif=exif.tobytes(), quality=95)
    upright = Image.open(rotated).transpose(Image.Transpose.ROTATE_90)
    assert np.array_equal(ours(str(rotated))["pixel_values"][0], ours(upright)["pixel_values"][0])


def test_return_types_and_batches(ref, ours, photo):
    images = [photo, photo.convert("L"), photo.resize((10, 300))]
    plain = ours(images)["pixel_values"]
    assert isinstance(plain, list) and len(plain) == 3 and plain[0].shape == (3, 224, 224)
    assert isinstance(ref(images)["pixel_values"], list)
    pt = ours(images, return_tensors="pt")["pixel_values"]
    want = ref(images, return_tensors="pt")["pixel_values"]
    assert isinstance(pt, torch.Tensor) and pt.dtype == want.dtype == torch.float32 and pt.shape == want.shape
    assert max_diff(pt, want) <= ATOL
    assert max_diff(ours([[photo], [photo]], return_tensors="np")["pixel_values"],
                    ref([[photo], [photo]], return_tensors="np")["pixel_values"]) <= ATOL
    with pytest.raises(ValueError, match="return_tensors"):
        ours(photo, return_tensors="tf")


SETTINGS = [
    {"use_square_size": False},  # shortest edge 224, aspect kept, then a real centre crop
    {"use_square_size": False, "do_center_crop": False},
    {"use_square_size": False, "size": {"shortest_edge": 100}, "crop_size": {"height": 150, "width": 120}},
    {"use_square_size": False, "size": {"height": 100, "width": 300}, "crop_size": {"height": 80, "width": 320}},
    {"crop_size": {"height": 200, "width": 210}},
    {"resample": 0}, {"resample": 1}, {"resample": 2}, {"resample": 4}, {"resample": 5},
    {"do_resize": False, "do_center_crop": False},
    {"do_rescale": False},
    {"do_normalize": False},
    {"do_rescale": False, "do_normalize": False},
    {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1.0]},
    {"rescale_factor": 0.5 / 255},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=[json.dumps(s, sort_keys=True) for s in SETTINGS])
def test_other_settings(photo, settings, shared_fixtures):
    config = {**RELEASED_PREPROCESSOR_CONFIG, **settings}
    ref = reference_image_processor(**settings)
    ours = Kosmos2ImageProcessor.from_dict(config)
    for image in (photo, photo.resize((50, 130)), _odd_images(photo)["RGBA"]):
        want = ref(image, return_tensors="np")["pixel_values"]
        got = ours(image, return_tensors="np")["pixel_values"]
        assert got.shape == want.shape and got.dtype == want.dtype
        assert max_diff(got, want) <= ATOL


def test_square_size_follows_the_configured_edge(photo):
    """With `use_square_size` the reference resizes to 224 x 224 whatever `size` says; we use the configured edge."""
    config = {**RELEASED_PREPROCESSOR_CONFIG, "size": {"shortest_edge": 336}, "crop_size": 336}
    ours = Kosmos2ImageProcessor.from_dict(config)
    assert ours.size == {"height": 336, "width": 336}
    assert ours(photo, return_tensors="np")["pixel_values"].shape == (1, 3, 336, 336)


def test_from_pretrained(tmp_path):
    assert Kosmos2ImageProcessor.from_pretrained(tmp_path).size == {"height": 224, "width": 224}
    config = {**RELEASED_PREPROCESSOR_CONFIG, "use_square_size": False, "size": {"shortest_edge": 256}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert Kosmos2ImageProcessor.from_pretrained(tmp_path).size == {"shortest_edge": 256}
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        Kosmos2ImageProcessor.from_pretrained(tmp_path)


def test_bad_settings():
    with pytest.raises(ValueError, match="size"):
        Kosmos2ImageProcessor(size={"longest_edge": 3})
    with pytest.raises(ValueError, match="resample"):
        Kosmos2ImageProcessor(resample=9)
    with pytest.raises(ValueError, match="image_mean"):
        Kosmos2ImageProcessor(image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="RGB"):
        Kosmos2ImageProcessor(do_convert_rgb=False)(Image.new("L", (4, 4)))


@pytest.mark.parametrize("settings", [{}, *SETTINGS],
                         ids=["released", *(json.dumps(s, sort_keys=True) for s in SETTINGS)])
def test_resized_bytes_and_the_lookup_table_give_the_exact_pixel_values(photo, settings, shared_fixtures):
    """What worker processes send (the resized picture's bytes) looked up in the table is, bit for bit, what
    `preprocess_one` computes (so `kosmos2 batch` and the service see the same pixel values as a script)."""
    ours = Kosmos2ImageProcessor.from_dict({**RELEASED_PREPROCESSOR_CONFIG, **settings})
    table = ours.lookup_table()
    assert table.shape == (3, 256)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))  # every byte value, each channel
    for image in (photo, photo.resize((50, 130)), _odd_images(photo)["RGBA"], noise,
                  *(Image.open(path) for path in fixture_images()[:2])):
        resized = ours.resized(image)
        assert resized.dtype == np.uint8 and resized.shape[0] == 3
        want = ours.preprocess_one(image)
        got = table[np.arange(3)[:, None, None], resized]
        assert got.dtype == want.dtype and np.array_equal(got, want)
