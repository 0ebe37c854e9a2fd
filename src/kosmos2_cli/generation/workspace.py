"""What generation keeps between calls for one model: decoders (each with its key/value cache and CUDA graphs) and
the image encoder's graphs. The generating model class declares one (`workspace`); nothing else is stored on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Workspace:
    decoders: dict[tuple, Any] = field(default_factory=dict)  # by (batch, capacity, device, dtype, graphs)
    vision_graph: Any = None  # a `Graphed` image encoder, on CUDA
    rows_run: Any = None  # the row scheduler's last run (its buffers and step graph), reused by the next alike

    def clear(self) -> None:
        """Drop the decoders and graphs (their memory goes back once nothing else holds them)."""
        self.decoders.clear()
        self.vision_graph = None
        self.rows_run = None
