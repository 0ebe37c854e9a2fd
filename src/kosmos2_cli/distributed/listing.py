"""The driver's listing of a `--ray` run: every image the inputs name, minus those the output file already holds.

A listing may be millions of names (a bucket, a text file of paths), so it never becomes a Python list: names
stream from the folder walk, the text file or the object store's listing (one folder at a time) into Arrow
string arrays of CHUNK names, and duplicates and finished images are dropped with Arrow's vectorised kernels.
What reaches Ray Data is the pending names as Arrow tables, one block each.

Inputs are what plain `batch` takes (files, folders, globs: the same names in the same order, `runtime.inputs`),
plus:
- a text file of paths (`.txt` or `.lst`): one image path or URI per line, taken as written (blank lines and
  lines starting with `#` skipped; a line that names no readable image gets its error record, as a missing
  file named on the command line would not: a list of millions is not checked on the driver);
- an object-store or filesystem URI (`s3://bucket/photos/`, `gs://...`, `file:///data/photos`, anything
  `pyarrow.fs.FileSystem.from_uri` opens): a folder is walked as a local one is (recursive, image extensions in
  any case, hidden names skipped, sorted), a single object is taken whatever its name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kosmos2_cli.api.tasks import TaskSpec
from kosmos2_cli.runtime.inputs import InputError, expand_inputs, is_image_name, iter_input
from kosmos2_cli.runtime.textfiles import listed

if TYPE_CHECKING:
    import pyarrow as pa

CHUNK = 65_536  # names per Arrow array while listing
LIST_SUFFIXES = frozenset({".txt", ".lst"})


def is_uri(name: str) -> bool:
    """`scheme://...` (s3, gs, hdfs, file...): read through pyarrow's filesystems."""
    head, sep, _ = name.partition("://")
    return bool(sep) and head.isalnum() and len(head) > 1


def is_list_file(name: str) -> bool:
    return not is_uri(name) and Path(name).suffix.lower() in LIST_SUFFIXES and Path(name).is_file()


@dataclass
class Listing:
    """The images of a run, in input order without duplicates: `names` (Arrow strings)."""

    names: pa.ChunkedArray

    def __len__(self) -> int:
        return len(self.names)

    def pending(self, done_keys: Iterable[str], spec: TaskSpec) -> pa.ChunkedArray:
        """The names whose record for `spec` is not among `done_keys` (the output file's resume keys)."""
        import pyarrow.compute as pc

        finished = images_of(done_keys, spec)
        if not finished or not len(self.names):
            return self.names
        return self.names.filter(pc.invert(pc.is_in(self.names, value_set=finished)))

    def count_in(self, keys: Iterable[str], spec: TaskSpec) -> int:
        """How many of the listed names have a key among `keys` for `spec`."""
        import pyarrow.compute as pc

        images = images_of(keys, spec)
        if not images or not len(self.names):
            return 0
        return pc.sum(pc.is_in(self.names, value_set=images)).as_py() or 0


def images_of(keys: Iterable[str], spec: TaskSpec) -> pa.Array | None:
    """The image names of the record keys (`api.tasks.record_key`) that are `spec`'s query."""
    import pyarrow as pa

    task, args = spec.task, json.loads(json.dumps(spec.args()))
    names = []
    for key in keys:
        image, key_task, key_args = json.loads(key)
        if key_task == task and key_args == args:
            names.append(image)
    return pa.array(names, pa.string()) if names else None


def list_inputs(inputs: Iterable[str]) -> Listing:
    """Every image the inputs name, each once (the first name it was reached by).

    Raises InputError for an input that names nothing (as plain batch does).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    names: list[pa.Array] = []
    reals: list[pa.Array] = []
    for name_chunk, real_chunk in _chunks(_names(inputs)):
        names.append(name_chunk)
        reals.append(real_chunk)
    if not names:
        raise InputError("no inputs")
    table = pa.Table.from_arrays([pa.chunked_array(names, pa.string()), pa.chunked_array(reals, pa.string())],
                                 names=["image", "real"])
    table = table.append_column("order", pa.array(range(len(table)), pa.int64()))
    first = table.group_by("real", use_threads=False).aggregate([("order", "min")])["order_min"]
    if len(first) < len(table):  # some image was reached twice: keep its first name
        table = table.take(pc.take(first, pc.sort_indices(first)))
    return Listing(pa.chunked_array([table["image"].combine_chunks()], pa.string()))


def _chunks(pairs: Iterator[tuple[str, str]]) -> Iterator[tuple[pa.Array, pa.Array]]:
    import pyarrow as pa

    names: list[str] = []
    reals: list[str] = []
    for name, real in pairs:
        names.append(name)
        reals.append(real)
        if len(names) >= CHUNK:
            yield pa.array(names, pa.string()), pa.array(reals, pa.string())
            names, reals = [], []
    if names:
        yield pa.array(names, pa.string()), pa.array(reals, pa.string())


def _names(inputs: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(name as given, what identifies the file) for every image of every input, duplicates included."""
    for given in inputs:
        if is_uri(given):
            source = _uri_names(given)
        elif is_list_file(given):
            source = _list_names(Path(given))
        else:
            source = ((name, os.path.realpath(name)) for name in iter_input(given))
        reached = 0
        for name, real in source:
            reached += 1
            yield name, real
        if not reached:
            if is_uri(given) or is_list_file(given):
                raise InputError(f"{given}: no images in it")
            expand_inputs([given])  # raises plain batch's own message for a folder or glob without images


def _list_names(path: Path) -> Iterator[tuple[str, str]]:
    """The lines of a text file of paths, as written (relative paths are from the current folder)."""
    for name in listed(path, "a list of images", InputError):
        yield name, (name if is_uri(name) else os.path.abspath(name))


def open_uri(uri: str):
    """(pyarrow filesystem, path inside it) for a URI; InputError when pyarrow cannot open it."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... with its own words
        raise InputError(f"{uri}: cannot open ({' '.join(str(err).split())})") from err


def _uri_names(uri: str) -> Iterator[tuple[str, str]]:
    """The images under a URI: one folder's listing at a time, folders in sorted order, depth first."""
    from pyarrow import fs

    filesystem, path = open_uri(uri)
    scheme = uri.partition("://")[0]
    prefix = f"{scheme}://"

    def named(inner: str) -> str:
        return prefix + inner if scheme != "file" or inner.startswith("/") else prefix + "/" + inner

    try:
        info = filesystem.get_file_info(path)
    except Exception as err:
        raise InputError(f"{uri}: cannot read ({' '.join(str(err).split())})") from err
    if info.type == fs.FileType.File:
        yield uri, uri
        return
    if info.type != fs.FileType.Directory:
        raise InputError(f"{uri}: no such file or folder")
    stack = [path.rstrip("/")]
    while stack:
        folder = stack.pop()
        try:
            entries = filesystem.get_file_info(fs.FileSelector(folder, recursive=False))
        except Exception as err:
            raise InputError(f"{named(folder)}: cannot list ({' '.join(str(err).split())})") from err
        entries.sort(key=lambda entry: entry.base_name)
        subfolders = []
        for entry in entries:
            if entry.base_name.startswith("."):
                continue
            if entry.type == fs.FileType.Directory:
                subfolders.append(entry.path)
            elif entry.type == fs.FileType.File and is_image_name(entry.base_name):
                name = named(entry.path)
                yield name, name
        del entries
        stack.extend(reversed(subfolders))
