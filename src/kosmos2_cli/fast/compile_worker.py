"""A process that compiles some of the fast path's Triton kernels into Triton's disk cache, and builds their C
launchers there, without running them (`fast.precompile` starts several while the command imports torch).

`python -m kosmos2_cli.fast.compile_worker CONFIG DEVICE DTYPE PART PARTS`: the probes `PART::PARTS` of
`precompile.probes`, on CPU tensors of the model's layouts, with each kernel's launch replaced by Triton's
`warmup` (compile only). It opens no CUDA context (no GPU memory): Triton only asks the device's capability.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path


class _CompileOnly:
    """A Triton kernel whose `kernel[grid](...)` compiles for the GPU and builds the launcher, launching nothing."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            from triton.runtime import driver

            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            driver.active.launcher_cls(compiled.src, compiled.metadata)  # the C launcher, into the disk cache

        return compile_only


def main(argv: list[str]) -> int:
    config_path, device_word, dtype_word, part, parts = argv
    threading.current_thread().name = f"kosmos2-compile-{part}"
    import torch
    import triton

    from kosmos2_cli.fast import kernels, precompile
    from kosmos2_cli.fast.marks import mark
    from kosmos2_cli.model.config import Kosmos2Config
    from kosmos2_cli.model.devices import resolve_device, resolve_dtype

    device = resolve_device(device_word)
    dtype = resolve_dtype(dtype_word, device)
    pdl = kernels.use_pdl(device)  # the device's capability: no context
    kernels.use_pdl = lambda _device: pdl  # the probes' tensors are on the CPU
    for name in dir(kernels):
        if isinstance(getattr(kernels, name), triton.runtime.JITFunction):
            setattr(kernels, name, _CompileOnly(getattr(kernels, name)))
    config = Kosmos2Config.from_json_file(Path(config_path))
    for call in precompile.probes(config, torch.device("cpu"), dtype)[int(part)::int(parts)]:
        call()
    mark("compile worker done", {"part": int(part), "context": _context_opened(device.index or 0)}, once=False)
    return 0


def _context_opened(index: int) -> bool | None:
    """Whether this process holds the device's primary context (it should not: a context costs GPU memory, and
    the command sizes its batch by the memory free)."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    if driver.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    if driver.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) != 0:
        return None
    return bool(active.value)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
