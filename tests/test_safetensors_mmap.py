"""The memory-mapped safetensors reader: same tensors as safetensors' own loader, views not copies, pages handed
back without changing a value, and a clear error for each way a file can be broken."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from kosmos2_cli.model.safetensors_mmap import MappedSafetensors, SafetensorsFormatError


@pytest.fixture
def tensors():
    torch.manual_seed(0)
    return {
        "a.weight": torch.randn(300, 257),
        "b.bias": torch.randn(7).to(torch.bfloat16),
        "c.half": torch.randn(3, 5).half(),
        "d.ids": torch.arange(11, dtype=torch.int64),
        "e.flag": torch.tensor([True, False, True]),
        "f.int8": torch.randint(-128, 127, (9,), dtype=torch.int8),
        "g.empty": torch.zeros(0, 4),
        "h.scalar": torch.tensor(2.5),
    }


def test_same_tensors_as_safetensors(tensors, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    mapped = MappedSafetensors(path)
    assert mapped.metadata == {"format": "pt"}
    assert sorted(mapped.keys()) == sorted(tensors)
    reference = load_file(str(path))
    for key in mapped.keys():
        assert mapped.shape(key) == tuple(reference[key].shape)
        assert mapped.dtype(key) == reference[key].dtype
        assert torch.equal(mapped.tensor(key), reference[key]), key


def test_tensors_are_views_of_one_map_and_survive_release(tensors, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    mapped = MappedSafetensors(path)
    first, again = mapped.tensor("a.weight"), mapped.tensor("a.weight")
    assert first.data_ptr() == again.data_ptr()  # the file's bytes, not a copy
    assert not first.untyped_storage().resizable()
    for key in mapped.keys():
        mapped.release(mapped.tensor(key))
    mapped.trim()
    assert torch.equal(first, tensors["a.weight"])  # pages come back from the file when read again
    first.add_(1)  # a private map: writable, never written to the file
    assert torch.equal(load_file(str(path))["a.weight"], tensors["a.weight"])


def test_release_view_finds_the_map(tensors, tmp_path):
    from kosmos2_cli.model.safetensors_mmap import release_view

    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    view = MappedSafetensors(path).tensor("a.weight")  # the file object is gone; the view keeps the map
    assert release_view(view)
    assert torch.equal(view, tensors["a.weight"])
    assert not release_view(torch.randn(1000))


def test_keys_follow_the_file(tensors, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    mapped = MappedSafetensors(path)
    offsets = [mapped._entries[key][2] for key in mapped.keys()]
    assert offsets == sorted(offsets)


def write_raw(path, header: dict | bytes, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "header, data, message",
    [
        (b"{not json", b"", "header is not JSON"),
        (b"[1, 2]", b"", "not a JSON object"),
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "do not fit its shape"),
        ({"x": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "bad header entry"),
        ({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, "negative dimension"),
    ],
)
def test_broken_files_are_named(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(SafetensorsFormatError, match=message):
        MappedSafetensors(path)


def test_short_file_and_oversized_header(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\1\2")
    with pytest.raises(SafetensorsFormatError, match="shorter than"):
        MappedSafetensors(path)
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="does not fit"):
        MappedSafetensors(path)


def test_misaligned_tensor_is_copied(tmp_path):
    """A file whose offsets leave a float32 tensor off its alignment still reads correctly."""
    values = torch.arange(6, dtype=torch.float32)
    header = {"pad": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-aligned, so "x" sits at an odd address
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\7" + values.numpy().tobytes())
    mapped = MappedSafetensors(path)
    assert torch.equal(mapped.tensor("x"), values.view(2, 3))
    assert int(mapped.tensor("pad")) == 7


def test_float32_model_weights_are_the_files_pages(tmp_path):
    """Loading in the file's dtype copies nothing: parameters are views of the map; a conversion makes copies."""
    from oracle import save_reference_checkpoint, tiny_config

    from kosmos2_cli import Kosmos2ForConditionalGeneration

    small = dict(text=dict(embed_dim=24, attention_heads=2, ffn_dim=32, layers=1), latent_query_num=4,
                 vision=dict(hidden_size=16, num_attention_heads=2, intermediate_size=24, num_hidden_layers=1))
    save_reference_checkpoint(tmp_path, tiny_config(**small))
    model = Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)
    weight = model.text_model.model.layers[0].ffn.fc1.weight
    assert not weight.untyped_storage().resizable()  # torch.frombuffer over the map
    converted = Kosmos2ForConditionalGeneration.from_pretrained(tmp_path, dtype="bfloat16")
    assert converted.text_model.model.layers[0].ffn.fc1.weight.untyped_storage().resizable()
