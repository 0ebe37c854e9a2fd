"""kosmos2-cli: Kosmos-2 grounding (captions, phrases linked to boxes) in plain PyTorch.

Public names are imported lazily so that `kosmos2 --help` never pays for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Kosmos2Config": "kosmos2_cli.model.config",
    "Kosmos2TextConfig": "kosmos2_cli.model.config",
    "Kosmos2VisionConfig": "kosmos2_cli.model.config",
    "Kosmos2Model": "kosmos2_cli.model.kosmos2",
    "Kosmos2ForConditionalGeneration": "kosmos2_cli.api.models",
    "Kosmos2Processor": "kosmos2_cli.processing.processor",
    "Kosmos2Tokenizer": "kosmos2_cli.processing.tokenizer",
    "Kosmos2ImageProcessor": "kosmos2_cli.processing.image_processing",
    "Kosmos2": "kosmos2_cli.api.pipeline",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from kosmos2_cli.api.models import Kosmos2ForConditionalGeneration
    from kosmos2_cli.api.pipeline import Kosmos2
    from kosmos2_cli.model.config import Kosmos2Config, Kosmos2TextConfig, Kosmos2VisionConfig
    from kosmos2_cli.model.kosmos2 import Kosmos2Model
    from kosmos2_cli.processing.image_processing import Kosmos2ImageProcessor
    from kosmos2_cli.processing.processor import Kosmos2Processor
    from kosmos2_cli.processing.tokenizer import Kosmos2Tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kosmos2_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
