"""Checkpoints of a training run: the model in the hub's layout, and the state that resumes the run.

`OUT_DIR/checkpoint-NNNNNN/` holds `config.json`, `model.safetensors` and the tokenizer/processor files (so it
loads as `--model`), plus `training_state.json` (step, settings, data order, scheduler, optimizer groups) and
`training_state.safetensors` (optimizer moments, random generator states, a LoRA run's factors). No pickle:
tensors go to safetensors, everything else to JSON. Each is written into a temporary folder beside it, then
renamed into place, so a killed run leaves whole checkpoints only. The finished model is put at the top of
OUT_DIR the same way, file by file (each an atomic rename), `training_state.json` last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
MODEL_FILE = "model.safetensors"
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
# Beside the weights, what makes a folder a model for every command (tokenizer and image settings).
SIDE_FILES = ("sentencepiece.bpe.model", "preprocessor_config.json", "tokenizer_config.json",
              "special_tokens_map.json")


def write_model(folder: Path, state: Mapping[str, Tensor], config, source: Path) -> None:
    """config.json, model.safetensors (the tied head left out, as the reference writes it) and the source
    model's tokenizer and processor files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tensors = dict(state)
    if getattr(config.text_config, "tie_word_embeddings", True):
        tensors.pop("text_model.lm_head.weight", None)
    tensors = {name: value.detach().to("cpu").contiguous().clone() for name, value in tensors.items()}
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def write_state(folder: Path, info: dict[str, Any], tensors: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(info, indent=1) + "\n")


def read_state(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load_file

    info = json.loads((folder / STATE_JSON).read_text())
    return info, load_file(str(folder / STATE_TENSORS))


def atomic_folder(final: Path, fill) -> None:
    """`fill(temp)` builds the folder in a temporary sibling, which is then renamed to `final` (replacing an older
    one of that name)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        fill(temp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(temp, final)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def publish(checkpoint: Path, out: Path) -> None:
    """The finished model at the top of OUT_DIR: the checkpoint's files moved up one by one (each an atomic
    rename), the training state last, so a folder with `training_state.json` saying done is complete."""
    names = sorted(p.name for p in checkpoint.iterdir() if p.name != STATE_JSON) + [STATE_JSON]
    for name in names:
        os.replace(checkpoint / name, out / name)
    shutil.rmtree(checkpoint, ignore_errors=True)


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The whole checkpoints in OUT_DIR by step (a temporary folder of a killed write does not count)."""
    found = []
    if out.is_dir():
        for path in out.iterdir():
            match = CHECKPOINT.fullmatch(path.name)
            if match and path.is_dir() and (path / STATE_JSON).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def clean_temporaries(out: Path) -> None:
    """Half-written folders left by a killed run (never renamed into place)."""
    if out.is_dir():
        for path in out.glob(".checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)


# --- optimizer, scheduler and random state as tensors + JSON --------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The optimizer's state_dict split into JSON (groups, scalars) and tensors (moments, step counts)."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, info: dict[str, Any], tensors: Mapping[str, Tensor]
                         ) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in info["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def rng_state() -> dict[str, Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    return tensors


def load_rng_state(tensors: Mapping[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
