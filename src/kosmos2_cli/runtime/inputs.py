"""Turning the command line's INPUTS (files, folders, globs) into the list of images to process.

A file named on the command line is taken whatever its extension (the user asked for it; if it is no image,
its record says so). Folders (recursively) and globs contribute files with an image extension, compared
case-insensitively; hidden files and folders (names starting with ".") inside folders are skipped. Each image
appears once, under the first name it was reached by, in a stable (sorted) order.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".ppm",
     ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".qoi"}
)
_GLOB_CHARS = frozenset("*?[")


class InputError(ValueError):
    """An input that names nothing: a missing path, or a folder or glob without images."""


def is_image_name(name: str | os.PathLike[str]) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Image paths (as strings, built from the user's spelling of each input) in order, without duplicates.

    Raises InputError for an input that does not exist, or a folder or glob that holds no image.
    """
    found: list[str] = []
    seen: set[str] = set()
    for given in inputs:
        reached = 0
        for path in _expand_one(given):
            reached += 1
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                found.append(path)
        if not reached:
            kind = "glob" if _is_glob(given) and not Path(given).expanduser().is_dir() else "folder"
            raise InputError(f"{given}: no images in this {kind} (looked for {_extensions_hint()}...)")
    return found


def iter_input(given: str) -> Iterator[str]:
    """The images one INPUT names, lazily, as `expand_inputs` takes them (before duplicates are dropped); raises
    InputError for a path that does not exist. For callers that stream a listing instead of holding it."""
    return _expand_one(given)


def _expand_one(given: str) -> Iterator[str]:
    path = Path(given).expanduser()
    if path.is_dir():
        yield from _walk(path)
        return
    if path.exists():
        yield str(path)
        return
    if _is_glob(given):
        matches = sorted(glob.glob(_any_case_extension(os.path.expanduser(given)), recursive=True))
        for match in matches:
            if Path(match).is_dir():
                yield from _walk(Path(match))
            elif is_image_name(match):
                yield str(Path(match))
        return
    raise InputError(f"{given}: no such file or directory")


def _walk(folder: Path) -> Iterator[str]:
    visited: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a symlink loop, or a folder reached twice
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and is_image_name(name):
                yield str(Path(root) / name)


def _any_case_extension(pattern: str) -> str:
    """`*.jpg` -> `*.[jJ][pP][gG]`: a glob's literal extension matches in any case, as image extensions do."""
    head, dot, extension = pattern.rpartition(".")
    if not dot or not extension.isalnum() or "/" in extension or os.sep in extension:
        return pattern
    return head + dot + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in extension)


def _is_glob(text: str) -> bool:
    return any(c in _GLOB_CHARS for c in text)


def _extensions_hint() -> str:
    return ", ".join(("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff"))
