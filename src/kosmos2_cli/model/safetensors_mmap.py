"""A safetensors file read through one private memory map: tensors are views of the file, not copies.

Why not `safetensors.safe_open`: its tensors also come from a map, but the map stays resident until the file
is closed, so converting a checkpoint tensor by tensor (to bf16, to int8) holds the whole float file *and* the
converted model in memory at the peak. Here each tensor's pages can be handed back (`release`) as soon as it
is converted, and a tensor kept in the file's own dtype costs no copy at all (its pages are the page cache's).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import weakref
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
_PAGE = mmap.PAGESIZE
_FAULT_AROUND = 256 * 1024


# Every open map, by address range, so a tensor that will no longer be read can hand its pages back
# (release_view) after its file object is gone; weak, so a map closes once no tensor views it.
_MAPS: list[tuple[int, int, weakref.ref]] = []


def release_view(tensor: torch.Tensor) -> bool:
    """Drop the pages under `tensor` if it is a view of one of our maps (True); for tensors about to be
    discarded, e.g. weights a fused copy replaces. Pages come back from the file if the view is read again."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    _MAPS[:] = [entry for entry in _MAPS if entry[2]() is not None]
    for base, length, ref in _MAPS:
        mapped = ref()
        if mapped is not None and base <= start and end <= base + length and tensor.is_contiguous():
            # Whole pages inside the view only: a neighbour sharing a page may have been written to.
            first = -(-(start - base) // _PAGE) * _PAGE
            last = (end - base) // _PAGE * _PAGE
            if last > first:
                mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
            return True
    return False


class SafetensorsFormatError(ValueError):
    """The file is not a readable safetensors file (truncated, corrupt header, offsets out of range)."""


class MappedSafetensors:
    """Read-only view of one safetensors file: `keys()`, `shape(key)`, `tensor(key)`, `release(tensor)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        size = os.path.getsize(self.path)
        if size < 8:
            raise SafetensorsFormatError("file shorter than its 8-byte header length")
        with open(self.path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > min(_MAX_HEADER, size - 8):
                raise SafetensorsFormatError(f"header length {header_len} does not fit the {size}-byte file")
            try:
                header = json.loads(handle.read(header_len))
            except (UnicodeDecodeError, ValueError) as err:
                raise SafetensorsFormatError(f"header is not JSON ({err})") from err
            # ACCESS_COPY is a private map: writable views for torch, never written back to the file.
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        if not isinstance(header, dict):
            raise SafetensorsFormatError("header is not a JSON object")
        self._data_start = 8 + header_len
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = {key: self._check(key, entry, size - self._data_start) for key, entry in header.items()}
        self._base = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr() if size else 0
        self._dropped: list[tuple[int, int]] = []
        if size:
            _MAPS.append((self._base, size, weakref.ref(self._map)))

    @staticmethod
    def _check(key: str, entry: object, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsFormatError(f"tensor {key}: bad header entry {entry!r}") from err
        numel = 1
        for dim in shape:
            if dim < 0:
                raise SafetensorsFormatError(f"tensor {key}: negative dimension in shape {list(shape)}")
            numel *= dim
        if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
            raise SafetensorsFormatError(f"tensor {key}: data offsets [{begin}, {end}] do not fit its shape "
                                         f"{list(shape)} or the file (truncated?)")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        """Tensor names in file order, so that reading them walks the file front to back."""
        return sorted(self._entries, key=lambda key: self._entries[key][2])

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def span(self, key: str) -> tuple[int, int]:
        """(offset in the file, byte count) of the tensor's data: for reading it without the map."""
        _, _, begin, end = self._entries[key]
        return self._data_start + begin, end - begin

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor as a view of the map (a copy only when the file leaves it misaligned for its dtype)."""
        dtype, shape, begin, end = self._entries[key]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        offset = self._data_start + begin
        if offset % dtype.itemsize:
            raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=offset)
            return raw.clone().view(dtype).reshape(shape)
        return torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=offset).reshape(shape)

    def release(self, view: torch.Tensor) -> None:
        """Drop the pages under a contiguous view from this process (they come back from the file if read again).

        Only for views nobody writes: dropping a page of a private map forgets writes to it.
        """
        start = view.data_ptr() - self._base
        length = view.numel() * view.element_size()
        if not view.is_contiguous() or start < 0 or start + length > len(self._map) or length == 0:
            return
        # Reading this view mapped a window of neighbouring pages back in behind it (the kernel's fault-around,
        # 64 KiB by default): reach back over it too.
        first = max(0, (start - _FAULT_AROUND) // _PAGE * _PAGE)
        last = min(-(-(start + length) // _PAGE) * _PAGE, len(self._map))
        self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
        self._dropped.append((first, last))

    def trim(self) -> None:
        """Release every range released so far once more: pages the kernel's fault-around mapped back in after
        their release (measured at ~50 MB scattered over a full-size checkpoint without this) go too."""
        ranges = sorted(self._dropped)
        self._dropped = []
        merged: list[list[int]] = []
        for first, last in ranges:
            if merged and first <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        for first, last in merged:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
