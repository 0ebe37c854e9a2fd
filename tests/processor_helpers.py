"""Shared pieces of the processor tests: our objects built once per session, conversions for comparisons."""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

import numpy as np
from oracle import RELEASED_PREPROCESSOR_CONFIG, SP_MODEL

from kosmos2_cli.processing.image_processing import Kosmos2ImageProcessor
from kosmos2_cli.processing.processor import Kosmos2Processor
from kosmos2_cli.processing.tokenizer import Kosmos2Tokenizer


@cache
def our_tokenizer() -> Kosmos2Tokenizer:
    return Kosmos2Tokenizer(SP_MODEL)


@cache
def our_processor() -> Kosmos2Processor:
    return Kosmos2Processor(Kosmos2ImageProcessor.from_dict(RELEASED_PREPROCESSOR_CONFIG), our_tokenizer())


def plain(value):
    """Lists of Python numbers from tensors/arrays/lists, for exact comparisons."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def assert_same_encoding(ref, ours, atol: float = 1e-6) -> None:
    """Same keys, same container types, same ids/masks, pixel values within `atol`."""
    assert set(ref.keys()) == set(ours.keys())
    for key in ref:
        a, b = ref[key], ours[key]
        if key == "pixel_values":
            if isinstance(a, list):
                assert isinstance(b, list) and len(a) == len(b)
                assert all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(a, b, strict=True))
            else:
                assert type(a) is type(b) and tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
            diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))
            assert diff <= atol, f"pixel values differ by {diff}"
        else:
            assert type(a) is type(b) or (isinstance(a, list) and isinstance(b, list)), (key, type(a), type(b))
            if hasattr(a, "dtype"):
                assert a.dtype == b.dtype, (key, a.dtype, b.dtype)
            assert plain(a) == plain(b), key


def random_text(rng: random.Random, pools: list, max_len: int = 12) -> str:
    return "".join(rng.choice(pools)() for _ in range(rng.randint(0, max_len)))


def write_model_dir(folder: Path, preprocessor: dict | None = None) -> Path:
    """A model folder with the released tokenizer (a symlink, not a copy) and optional image settings."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sentencepiece.bpe.model").symlink_to(SP_MODEL)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder
