"""Checkpoint loading: hub layout, shards, tied head, dtype/device, and a clear error for each way it can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from oracle import save_reference_checkpoint, tiny_config
from safetensors.torch import load_file, save_file

from kosmos2_cli import Kosmos2Config, Kosmos2ForConditionalGeneration, Kosmos2Model
from kosmos2_cli.model import weights
from kosmos2_cli.model.hub import ModelNotFoundError
from kosmos2_cli.model.weights import WeightsError

SMALL = dict(text=dict(embed_dim=24, attention_heads=2, ffn_dim=32, layers=2), latent_query_num=4,
             vision=dict(hidden_size=16, num_attention_heads=2, intermediate_size=24, num_hidden_layers=1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    ref = save_reference_checkpoint(folder, tiny_config(**SMALL))
    return folder, ref


def copy_checkpoint(src, dst, edit=None):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "sentencepiece.bpe.model"):
        (dst / name).write_bytes((src / name).read_bytes())
    state = load_file(str(src / "model.safetensors"))
    if edit:
        edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_loads_every_tensor_exactly(checkpoint):
    folder, ref = checkpoint
    ours = Kosmos2ForConditionalGeneration.from_pretrained(folder)
    theirs = ref.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    assert ours.text_model.lm_head.weight is ours.text_model.model.embed_tokens.weight


def test_dtype_and_device_at_load(checkpoint):
    folder, _ = checkpoint
    model = Kosmos2ForConditionalGeneration.from_pretrained(folder, dtype="bfloat16", device="cpu")
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not any(p.is_meta for p in model.parameters())
    assert model.text_model.model.embed_positions.dtype == torch.bfloat16


def test_kosmos2model_ignores_the_head(checkpoint, tmp_path):
    folder, ref = checkpoint

    def add_head(state):
        state["text_model.lm_head.weight"] = state["text_model.model.embed_tokens.weight"].clone()

    copy_checkpoint(folder, tmp_path, add_head)
    base = Kosmos2Model.from_pretrained(tmp_path)
    assert torch.equal(base.text_model.model.embed_tokens.weight, ref.text_model.model.embed_tokens.weight)
    full = Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)
    assert full.text_model.lm_head.weight is full.text_model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_load_gives_the_mapped_loads_tensors(checkpoint, dtype, monkeypatch):
    """The GPU's loader (parallel reads into buffers, then convert), run on the CPU, gives the same model."""
    folder, _ = checkpoint
    mapped = Kosmos2ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    monkeypatch.setattr(weights, "_streams", lambda model, device: True)
    monkeypatch.setattr("kosmos2_cli.model.staging.CHUNK", 1000)  # tensors span several reads
    streamed = Kosmos2ForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    theirs = mapped.state_dict()
    for name, tensor in streamed.state_dict().items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    assert streamed.text_model.lm_head.weight is streamed.text_model.model.embed_tokens.weight


def test_sharded_checkpoint(checkpoint, tmp_path):
    folder, ref = checkpoint
    state = load_file(str(folder / "model.safetensors"))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model = Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(model.vision_model.model.post_layernorm.weight, ref.vision_model.model.post_layernorm.weight)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("text_model.model.layers.1.ffn.fc1.weight"), "missing tensor text_model.model.layers.1"),
        (lambda s: s.__setitem__("text_model.model.extra.weight", torch.zeros(2)), "unexpected tensor text_model"),
        (lambda s: s.__setitem__("image_to_text_projection.latent_query", torch.zeros(5, 24)),
         "image_to_text_projection.latent_query has shape [5, 24], the config needs [4, 24]"),
    ],
)
@pytest.mark.parametrize("streamed", [False, True], ids=["mapped", "streamed"])
def test_bad_tensors_are_named(checkpoint, tmp_path, edit, message, streamed, monkeypatch):
    folder, _ = checkpoint
    copy_checkpoint(folder, tmp_path, edit)
    monkeypatch.setattr(weights, "_streams", lambda model, device: streamed)
    with pytest.raises(WeightsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)


def test_pickled_weights_are_refused(checkpoint, tmp_path):
    folder, _ = checkpoint
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    with pytest.raises(WeightsError, match="pickled weights .*pytorch_model.bin.*safetensors only"):
        Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_and_corrupt_weight_files(checkpoint, tmp_path):
    folder, _ = checkpoint
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="no model.safetensors"):
        Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)


def test_wrong_folder_or_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        Kosmos2ForConditionalGeneration.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a Kosmos-2 checkpoint"):
        Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{ broken")
    with pytest.raises(ValueError, match="not a readable config.json"):
        Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)


def test_offline_hub_id_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not in the local cache and offline mode is on"):
        Kosmos2ForConditionalGeneration.from_pretrained("someone/not-cached-kosmos")


def test_config_round_trip_keeps_released_fields(checkpoint, tmp_path):
    folder, ref = checkpoint
    config = Kosmos2Config.from_json_file(folder / "config.json")
    assert config.text_config.embed_dim == 24 and config.text_config.hidden_size == 24
    assert config.vision_config.num_hidden_layers == 1 and config.latent_query_num == 4
    config.save_pretrained(tmp_path)
    again = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    assert again["text_config"] == original["text_config"]
    assert again["vision_config"] == original["vision_config"]
    default = Kosmos2Config()
    assert (default.text_config.embed_dim, default.text_config.layers, default.vision_config.hidden_size) == (
        2048, 24, 1024)


def test_save_pretrained_round_trip(checkpoint, tmp_path):
    folder, _ = checkpoint
    model = Kosmos2ForConditionalGeneration.from_pretrained(folder)
    model.save_pretrained(tmp_path)
    assert "text_model.lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    again = Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
