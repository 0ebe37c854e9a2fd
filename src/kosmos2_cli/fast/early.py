"""One-off start-up costs begun on background threads, so that they overlap work that does not need them.

A new process pays once for CUDA's driver and the GPU's context (~0.3 s on an H100 host), once for importing
Triton and the kernels (~0.15 s of Python) and once for cuBLAS's first product (~0.1 s). Meanwhile the command
line spends more than a second importing torch, and loading the weights mostly waits on the copy engine: begun
early, these costs hide behind that work.

The driver is started through ctypes (`cuInit`, then the device's primary context, the one CUDA's runtime and so
PyTorch use): a ctypes call releases the GIL, whereas PyTorch's own initialisation holds it throughout.
Whatever fails here is left alone: PyTorch and the import that needs Triton meet the same problem again and
report it in their own words.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is not imported here: the command line starts the driver before it imports torch
    import torch

_begun: dict[str, threading.Thread] = {}
_DRIVERS = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")


def cuda_index(device: str | torch.device | None) -> int | None:
    """The CUDA device a `--device` word or torch.device may mean (None: surely not a GPU)."""
    kind, _, index = str(device or "auto").strip().lower().partition(":")
    if kind not in ("auto", "cuda") or (index and not index.isdigit()):
        return None
    return int(index or 0)


def start_cuda(device: str | torch.device | None = "auto") -> None:
    """Begin CUDA's driver and the device's context on a thread, where `device` may be a GPU (once a process)."""
    index = cuda_index(device)
    if index is not None:
        _begin("cuda", _open_context, index)


def start_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """Begin importing Triton and the kernels on a thread, then a first small matrix product on `device` in
    `dtype` (cuBLAS's libraries and handle; ~0.1 s off the first image), once a process."""
    _begin("kernels", _import_kernels, device, dtype)


def _begin(name: str, work, *args) -> None:
    if name not in _begun:
        _begun[name] = threading.Thread(target=work, args=args, daemon=True, name=f"kosmos2-early-{name}")
        _begun[name].start()


def _open_context(index: int) -> None:
    for name in _DRIVERS:
        try:
            driver = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return
    device, context = ctypes.c_int(), ctypes.c_void_p()
    if driver.cuInit(0) == 0 and driver.cuDeviceGet(ctypes.byref(device), index) == 0:
        # Kept for the life of the process, as the runtime keeps its own reference to the same context.
        driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)


def _import_kernels(device: torch.device, dtype: torch.dtype) -> None:
    try:
        import kosmos2_cli.fast.kernels  # noqa: F401
    except Exception:  # noqa: BLE001 - the fast path imports it again and decides
        pass
    try:
        import torch

        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            square = torch.ones(64, 64, device=device, dtype=dtype)
            square @ square
        stream.synchronize()
    except Exception:  # noqa: BLE001 - the model's own first product meets the same problem
        pass
