"""Reading and writing checkpoints: safetensors only, tensor by tensor, straight to the target device and dtype.

Nothing is ever unpickled. A missing, unexpected or mis-shaped tensor is an error that names it. For a GPU the
files are read in parallel into pinned memory and converted there (`staging`). Otherwise they are
memory-mapped: a tensor kept in the file's dtype on the CPU is the file's pages (no copy); a converted one
(another dtype, int8) hands its pages back once converted, so the peak stays near the model's own size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from kosmos2_cli.model.safetensors_mmap import MappedSafetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some exporters write that the model rebuilds itself.
_REBUILT = re.compile(r"(position_ids|embed_positions\.weights?)$")


class WeightsError(ValueError):
    """The checkpoint does not fit the model; the message names the file and the tensor."""


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, single or sharded."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WeightsError(f"{index}: not a valid safetensors index ({err})") from err
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise WeightsError(f"{shard}: shard named in {INDEX_FILE} is missing")
        return shards
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickled:
        raise WeightsError(
            f"{folder}: has only pickled weights ({', '.join(pickled)}); kosmos2-cli loads safetensors only "
            "(convert them with safetensors' torch.save_file, or use the hub's model.safetensors)"
        )
    raise WeightsError(f"{folder}: no {SINGLE_FILE} (or {INDEX_FILE}) in the model folder")


def _open(path: Path) -> MappedSafetensors:
    try:
        return MappedSafetensors(path)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a valid safetensors file ({err})") from err


def _to_target(view: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The file's tensor on `device` in `dtype`; on the CPU in the file's own dtype it stays a view of the map."""
    return view.to(dtype).to(device) if view.is_floating_point() else view.to(device)


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    else:
        owner._buffers[attr] = tensor


class _Expected:
    """Which checkpoint tensors the model takes; names the first wrong, unexpected or missing one."""

    HEAD = "text_model.lm_head.weight"

    def __init__(self, model: nn.Module, folder: Path) -> None:
        self.folder = folder
        self.shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
        # Modules that quantize their own weight (kosmos2_cli.model.quant) hold no float `weight`; they name its shape.
        self.shapes.update({f"{name}.weight": tuple(module.weight_shape) for name, module in model.named_modules()
                            if hasattr(module, "take_weight")})
        self.tied = getattr(model.config.text_config, "tie_word_embeddings", True)
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []

    def wanted(self, path: Path, key: str, shape: tuple[int, ...]) -> bool:
        """Whether to load `key`; raises when its shape is not the model's."""
        if key not in self.shapes:
            if not _REBUILT.search(key) and key != self.HEAD:
                self.unexpected.append(key)
            return False
        if key == self.HEAD and self.tied:
            return False
        if shape != self.shapes[key]:
            raise WeightsError(f"{path.name}: tensor {key} has shape {list(shape)}, the config needs "
                               f"{list(self.shapes[key])} (is config.json from the same model?)")
        self.loaded.add(key)
        return True

    def check_names(self) -> None:
        if self.unexpected:
            more = f" (and {len(self.unexpected) - 1} more)" if len(self.unexpected) > 1 else ""
            raise WeightsError(f"{self.folder}: unexpected tensor {self.unexpected[0]}{more}: not a Kosmos-2 "
                               "checkpoint?")

    def check_complete(self) -> None:
        missing = sorted(set(self.shapes) - self.loaded - ({self.HEAD} if self.tied else set()))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise WeightsError(f"{self.folder}: missing tensor {missing[0]}{more} in the checkpoint")


def load_weights(model: nn.Module, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Fill a model built on the meta device from the checkpoint in `folder`."""
    expected = _Expected(model, folder)
    files = weight_files(folder)
    if _streams(model, device):
        _load_streamed(model, files, expected, device, dtype)
    else:
        _load_mapped(model, files, expected, device, dtype)
    expected.check_complete()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _rebuild_buffers(model, device)


def _streams(model: nn.Module, device: torch.device) -> bool:
    """Read through pinned buffers (a GPU target) rather than the memory map (CPU targets, int8 quantizing)."""
    return device.type == "cuda" and not any(hasattr(module, "take_weight") for module in model.modules())


def _load_mapped(model: nn.Module, files: list[Path], expected: _Expected, device: torch.device,
                 dtype: torch.dtype) -> None:
    """Tensor by tensor from a memory map: kept as the file's pages where possible, else converted and the
    pages handed back (so the peak stays near the model's size)."""
    for path in files:
        mapped = _open(path)
        for key in mapped.keys():
            if not expected.wanted(path, key, mapped.shape(key)):
                continue
            view = mapped.tensor(key)
            owner_name, _, attr = key.rpartition(".")
            take = getattr(model.get_submodule(owner_name), "take_weight", None) if attr == "weight" else None
            if take is not None:
                take(view, mapped.release)  # e.g. int8 layers quantize block by block, handing pages back
                continue
            tensor = _to_target(view, device, dtype)
            if tensor.data_ptr() != view.data_ptr():
                mapped.release(view)  # converted or copied: the file's pages are no longer needed
            _set_tensor(model, key, tensor)
        mapped.trim()
        expected.check_names()


def _load_streamed(model: nn.Module, files: list[Path], expected: _Expected, device: torch.device,
                   dtype: torch.dtype) -> None:
    """Every tensor's bytes read in parallel into pinned memory, copied to the GPU and converted there."""
    from kosmos2_cli.model.staging import Span, stream_spans

    spans, kinds = [], {}
    for path in files:
        mapped = _open(path)
        for key in mapped.keys():
            if expected.wanted(path, key, mapped.shape(key)):
                spans.append(Span(key, path, *mapped.span(key)))
                kinds[key] = (mapped.dtype(key), mapped.shape(key))
    expected.check_names()  # before reading gigabytes
    try:
        for span, raw in stream_spans(spans, device):
            file_dtype, shape = kinds[span.key]
            tensor = raw.view(file_dtype).view(shape)
            _set_tensor(model, span.key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    except OSError as err:
        raise WeightsError(f"{files[0].parent}: cannot read the weights ({err})") from err


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """The buffers no checkpoint holds (the sinusoidal positions), made on `device` for a model built on meta."""
    from kosmos2_cli.model.text import sinusoidal_table

    text = model.text_model.model
    config = text.config
    # Kept in the model's dtype, as the reference's buffer is once the model is cast.
    text.embed_positions = sinusoidal_table(
        config.max_position_embeddings + 2, config.embed_dim, config.pad_token_id
    ).to(device=device, dtype=text.layer_norm.weight.dtype)


def save_weights(model: nn.Module, folder: Path) -> None:
    """Write `model.safetensors` as the reference does (the tied head is left out)."""
    from safetensors.torch import save_file

    if any(hasattr(module, "take_weight") for module in model.modules()):
        raise ValueError("an int8 model cannot be saved (checkpoints hold float weights); load the model in "
                         "float32 or bfloat16 to save it")
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if getattr(model.config.text_config, "tie_word_embeddings", True):
        state.pop("text_model.lm_head.weight", None)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    storages: dict[int, int] = {}
    for v in state.values():
        storages[v.untyped_storage().data_ptr()] = storages.get(v.untyped_storage().data_ptr(), 0) + 1
    # Tensors that are views of one block (q/k/v after the fast path fused them) are written apart.
    state = {k: v.clone() if storages[v.untyped_storage().data_ptr()] > 1 else v for k, v in state.items()}
    save_file(state, str(folder / SINGLE_FILE), metadata={"format": "pt"})
