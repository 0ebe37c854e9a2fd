"""CUDA graphs for fixed-shape work: capture a function once per input shape, then replay it.

At small batches a transformer's forward is bound by the CPU launching hundreds of small kernels; a replayed
graph launches them all at once. The function must not read tensors back to the host, and its outputs are
overwritten by the next replay: use them before calling again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from kosmos2_cli.fast.marks import mark


class Graphed:
    """`fn(*tensors)` replayed from a CUDA graph captured for each distinct input shape.

    `save`/`restore` bracket the warm-up and the capture, for functions that update state (a KV cache): the
    warm-up really runs, and its updates must not count.
    """

    def __init__(self, fn: Callable[..., Tensor], save: Callable[[], object] | None = None,
                 restore: Callable[[object], None] | None = None, max_graphs: int = 8,
                 capture_after: int = 0) -> None:
        self.fn = fn
        self.save = save or (lambda: None)
        self.restore = restore or (lambda state: None)
        self.max_graphs = max_graphs
        # Calls of a shape that run eagerly before it is captured: a capture costs a warm-up and the capture,
        # which only pays off for shapes that recur (prompts of a batch job, not a one-off caption).
        self.capture_after = capture_after
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}

    def __call__(self, *tensors: Tensor, key: tuple = ()) -> Tensor:
        key = (*key, *((t.shape, t.dtype) for t in tensors))
        if key not in self.graphs and self.seen.get(key, 0) < self.capture_after:
            self.seen[key] = self.seen.get(key, 0) + 1
            return self.fn(*tensors)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
            self.graphs[key] = self._capture(tensors)
        if self.graphs[key] is None:
            return self.fn(*tensors)
        graph, inputs, output = self.graphs[key]
        for buffer, tensor in zip(inputs, tensors, strict=True):
            buffer.copy_(tensor)
        graph.replay()
        return output

    def _capture(self, tensors: tuple[Tensor, ...]):
        name = getattr(self.fn, "__name__", "fn")
        mark(f"capture {name} {_shapes(tensors)}")
        inputs = [t.clone() for t in tensors]
        state = self.save()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: lazy initialisation must not happen during capture
            self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.restore(state)
        graph = torch.cuda.CUDAGraph()
        try:
            # Capture on the warm-up's stream: libraries (cuBLAS) keep per-stream workspaces made during warm-up.
            with torch.cuda.graph(graph, stream=stream):
                output = self.fn(*inputs)
        except RuntimeError as err:  # a library call that cannot be captured: run this shape eagerly
            warnings.warn(f"CUDA graph capture failed, running eagerly instead ({err})", stacklevel=3)
            torch.cuda.synchronize()
            self.restore(state)
            return None
        self.restore(state)
        mark(f"captured {name} {_shapes(tensors)}")
        return graph, inputs, output


def _shapes(tensors) -> str:
    return " ".join("x".join(map(str, t.shape)) if isinstance(t, Tensor) else "-" for t in tensors)
