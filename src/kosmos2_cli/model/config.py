"""Kosmos-2 configuration, read from and written to the hub's `config.json`.

Field names and defaults are those of `microsoft/kosmos-2-patch14-224` (and of transformers' Kosmos2Config), so a
released `config.json` loads unchanged; keys we do not use are kept and written back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

CONFIG_NAME = "config.json"


class _ConfigBase:
    """Shared dict/JSON plumbing: unknown keys survive a round trip, aliases resolve to the canonical field."""

    aliases: ClassVar[dict[str, str]] = {}
    model_type: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None, **overrides: Any):
        data = {**(data or {}), **overrides}
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            key = cls.aliases.get(key, key)
            if key in known:
                kwargs[key] = value
            elif key != "model_type":
                extra[key] = value
        obj = cls(**kwargs)
        obj.extra = extra
        return obj

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out = {**self.extra, **out, "model_type": self.model_type}
        return dict(sorted(out.items()))

    def __getattr__(self, name: str) -> Any:
        # Only called for missing attributes: resolve aliases such as hidden_size -> embed_dim.
        canonical = type(self).aliases.get(name)
        if canonical is not None:
            return getattr(self, canonical)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def read_json_object(path: Path, unreadable: str, not_an_object: str) -> dict:
    """The JSON object in `path`; a ValueError naming the file, and saying `unreadable` or `not_an_object`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {unreadable} ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {not_an_object}")
    return data


@dataclass
class Kosmos2TextConfig(_ConfigBase):
    """The decoder: a 24-layer, 2048-wide transformer with sub-LayerNorm (MAGNETO-style) blocks."""

    aliases: ClassVar[dict[str, str]] = {
        "hidden_size": "embed_dim",
        "num_hidden_layers": "layers",
        "num_attention_heads": "attention_heads",
    }
    model_type: ClassVar[str] = "kosmos_2_text_model"

    vocab_size: int = 65037
    max_position_embeddings: int = 2048
    embed_dim: int = 2048
    layers: int = 24
    ffn_dim: int = 8192
    attention_heads: int = 32
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    scale_embedding: bool = True
    use_cache: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    tie_word_embeddings: bool = True
    add_cross_attention: bool = False  # the reference's option; Kosmos-2 never uses it (the model refuses True)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads


@dataclass
class Kosmos2VisionConfig(_ConfigBase):
    """The image encoder: CLIP ViT-L/14 at 224 px."""

    model_type: ClassVar[str] = "kosmos_2_vision_model"

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(init=False)
class Kosmos2Config(_ConfigBase):
    """The whole model: vision encoder, a resampler of `latent_query_num` queries, and the decoder."""

    model_type: ClassVar[str] = "kosmos-2"

    text_config: Kosmos2TextConfig
    vision_config: Kosmos2VisionConfig
    latent_query_num: int
    tie_word_embeddings: bool
    extra: dict[str, Any]

    def __init__(
        self,
        text_config: Kosmos2TextConfig | dict | None = None,
        vision_config: Kosmos2VisionConfig | dict | None = None,
        latent_query_num: int = 64,
        tie_word_embeddings: bool = True,
        **extra: Any,
    ) -> None:
        if not isinstance(text_config, Kosmos2TextConfig):
            text_config = Kosmos2TextConfig.from_dict(text_config)
        if not isinstance(vision_config, Kosmos2VisionConfig):
            vision_config = Kosmos2VisionConfig.from_dict(vision_config)
        self.text_config = text_config
        self.vision_config = vision_config
        self.latent_query_num = latent_query_num
        self.tie_word_embeddings = tie_word_embeddings
        self.extra = {k: v for k, v in extra.items() if k != "model_type"}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None, **overrides: Any) -> Kosmos2Config:
        return cls(**{**(data or {}), **overrides})

    def to_dict(self) -> dict[str, Any]:
        out = {
            **self.extra,
            "latent_query_num": self.latent_query_num,
            "tie_word_embeddings": self.tie_word_embeddings,
            "model_type": self.model_type,
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
        }
        out.setdefault("architectures", ["Kosmos2ForConditionalGeneration"])
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | Path) -> Kosmos2Config:
        path = Path(path)
        data = read_json_object(path, "not a readable config.json", "config.json must hold a JSON object")
        model_type = data.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(f"{path}: model_type is {model_type!r}, not a Kosmos-2 checkpoint ('kosmos-2')")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, revision: str | None = None) -> Kosmos2Config:
        from kosmos2_cli.model.hub import resolve_model_dir

        folder = resolve_model_dir(name_or_path, revision=revision)
        return cls.from_json_file(folder / CONFIG_NAME)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(self.to_json_string(), encoding="utf-8")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Kosmos2Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Kosmos2Config({asdict(self.text_config)!r}, {asdict(self.vision_config)!r}, {self.latent_query_num})"
