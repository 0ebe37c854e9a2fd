"""How tokens are chosen: the one options type that the API, the runner, the service and the CLI's flags share."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GenerationOptions:
    """Defaults are the model card's (greedy, up to 128 new tokens)."""

    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 50
    seed: int | None = None

    def kwargs(self) -> dict[str, Any]:
        """As `generate`'s keyword arguments."""
        return asdict(self)
