"""Helpers for the command-line tests: a tiny random checkpoint, test pictures of every kind, running `kosmos2`.

The random checkpoint (built once with the reference and cached under the temp dir) writes random text, which
is enough for the mechanics: JSON shape, errors, resume, drawing. Exact answers come from `trained.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
FAST = ["--max-new-tokens", "6"]  # random weights rarely stop: keep generations short


def random_checkpoint() -> Path:
    """A random tiny Kosmos-2 (64 image tokens, the real vocabulary) in the hub's layout, built once."""
    import oracle
    import trained

    key = hashlib.sha256(Path(oracle.__file__).read_bytes() + oracle.SP_MODEL.read_bytes()).hexdigest()[:12]
    return trained.cached_dir(f"random-{key}", lambda folder: oracle.save_reference_checkpoint(
        folder, oracle.tiny_config(latent_query_num=64)))


def photo(width: int = 64, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def rotated_jpeg(path: Path, width: int = 120, height: int = 60) -> Path:
    """A JPEG stored width x height whose EXIF says to view it turned 90° (height x width upright)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(photo(width, height), path, format="JPEG", exif=exif.tobytes())


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    photo(200, 150).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[:600])
    return path


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A tiny PNG whose header claims side x side pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def not_an_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is text, not a picture\n")
    return path


def invoke(args: list[str], **kwargs):
    """Run `kosmos2 ARGS` in-process (Typer's CliRunner); stdout and stderr apart."""
    from typer.testing import CliRunner

    from kosmos2_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # see `one_thread`
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def kosmos2_command() -> list[str]:
    """The command as a user runs it: this checkout's package, through its console-script entry point."""
    return [sys.executable, "-c", "import sys; from kosmos2_cli.cli.app import main; sys.argv[0] = 'kosmos2'; main()"]


def run_kosmos2(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*kosmos2_command(), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), **kwargs)


def cache_processors(monkeypatch) -> None:
    """Load each model folder's tokenizer once per test session (it dominates a tiny model's start-up)."""
    from kosmos2_cli.processing.processor import Kosmos2Processor

    original = Kosmos2Processor.from_pretrained.__func__
    cache = _PROCESSORS

    def cached(cls, name_or_path, revision=None):
        key = (str(name_or_path), revision)
        if key not in cache:
            cache[key] = original(cls, name_or_path, revision)
        return cache[key]

    monkeypatch.setattr(Kosmos2Processor, "from_pretrained", classmethod(cached))


_PROCESSORS: dict = {}



@pytest.fixture
def quick(monkeypatch):
    """Cached tokenizers, and one torch thread: for tiny models on a shared machine, one thread is several times
    faster than waiting for a second."""
    import torch

    cache_processors(monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["static", "continuous"])
def batch_modes(request, monkeypatch):
    """Run a test with rows refilled only once all are free (static batches, KOSMOS2_REFILL_SHARE=1) and as they
    free (the default). Gives the mode's name."""
    if request.param == "static":
        monkeypatch.setenv("KOSMOS2_REFILL_SHARE", "1")
    else:
        monkeypatch.delenv("KOSMOS2_REFILL_SHARE", raising=False)
    return request.param
