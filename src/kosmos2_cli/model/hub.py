"""Where a model's files come from: a local folder, or the Hugging Face hub through its standard cache."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL = "microsoft/kosmos-2-patch14-224"

# Only what the bundled engine reads: never pickled weights, never the other formats a repo may carry.
MODEL_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
]


class ModelNotFoundError(RuntimeError):
    """The model could not be found or fetched; the message says what is wrong, `advice` what to change."""

    def __init__(self, message: str, advice: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice  # what the caller can change, as a word the front end turns into its own terms


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and "\\" not in name


def offline_mode() -> bool:
    """HF_HUB_OFFLINE is set: nothing will be downloaded, only the cache is looked at."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None, *, download: bool = True) -> Path:
    """A local folder holding the model's files, downloading them into the hub cache on first use.

    `HF_HOME`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE` are honoured by huggingface_hub itself; with `download=False`
    only the cache is consulted.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise ModelNotFoundError(f"{name}: is a file, not a model folder or a hub repo id", advice="model")
    if not _looks_like_repo_id(name):
        raise ModelNotFoundError(f"{name}: no such model folder (and not a hub repo id like {DEFAULT_MODEL})")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = not download or offline_mode()
    try:
        folder = snapshot_download(name, revision=revision, allow_patterns=MODEL_FILES, local_files_only=offline)
    except GatedRepoError as err:
        raise ModelNotFoundError(f"{name}: gated on the hub; log in with `hf auth login` first") from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(f"{name}: no such model on the Hugging Face hub (or it is private)") from err
    except RevisionNotFoundError as err:
        raise ModelNotFoundError(f"{name}: revision {revision!r} not found on the hub") from err
    except LocalEntryNotFoundError as err:
        how = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the hub could not be reached"
        raise ModelNotFoundError(
            f"{name}: not in the local cache and {how}", advice="download") from err
    except (HfHubHTTPError, OSError) as err:
        raise ModelNotFoundError(f"{name}: download failed ({err.__class__.__name__}: {err})") from err
    return Path(folder)


def cached_model_dir(name: str, revision: str | None = None) -> Path | None:
    """The cached snapshot of a hub model if it is complete enough to load, else None (never downloads)."""
    try:
        folder = resolve_model_dir(name, revision, download=False)
    except ModelNotFoundError:
        return None
    has_weights = (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists()
    return folder if has_weights and (folder / "config.json").exists() else None
