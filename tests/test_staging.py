"""The GPU loader (`staging`): threaded reads, and the registered-map path run on the CPU with a recording
pin/unpin in place of cudaHostRegister; on CUDA, the real registration gives the file's bytes."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kosmos2_cli import Kosmos2ForConditionalGeneration
from kosmos2_cli.model import staging, weights
from kosmos2_cli.model.staging import Span, stream_pinned, stream_spans


class Pins:
    """Records pins and unpins; can be told to fail the n-th pin."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.live: dict[int, int] = {}
        self.pinned: list[tuple[int, int]] = []
        self.unpinned: list[int] = []
        self.most = 0
        self.lock = threading.Lock()

    def pin(self, address: int, nbytes: int) -> None:
        with self.lock:
            if self.fail_at is not None and len(self.pinned) == self.fail_at:
                self.fail_at = None
                raise OSError("cudaHostRegister failed (1)")
            assert nbytes > 0 and address not in self.live
            self.live[address] = nbytes
            self.pinned.append((address, nbytes))
            self.most = max(self.most, len(self.live))

    def unpin(self, address: int) -> None:
        with self.lock:
            assert address in self.live, "unpinned twice or never pinned"
            del self.live[address]
            self.unpinned.append(address)

    def settle(self) -> None:
        """Wait for the loader's unpin thread."""
        deadline = time.monotonic() + 10
        while self.live and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.live, f"{len(self.live)} pieces left pinned"


def files(tmp_path):
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    data = {first: bytes(range(256)) * 9, second: bytes(reversed(range(256))) * 3}
    for path, content in data.items():
        path.write_bytes(content)
    spans = [Span("x", first, 5, 1000), Span("empty", second, 10, 0), Span("y", second, 1, 700),
             Span("z", first, 2000, 304), Span("again", first, 60, 10)]
    return data, spans


def read(spans):
    return staging._stream_read(spans, torch.device("cpu"), chunk=64, buffers=3, threads=2)


def check(got, spans, data):
    assert [span for span, _ in got] == spans
    for span, tensor in got:
        assert tensor.dtype == torch.uint8
        assert bytes(tensor.tolist()) == data[span.path][span.offset : span.offset + span.nbytes], span.key


def test_threaded_reads_give_each_span_exactly(tmp_path):
    data, spans = files(tmp_path)
    check(list(read(spans)), spans, data)


def test_threaded_reads_past_the_end_is_an_error(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"0123456789")
    with pytest.raises(OSError, match="unexpected end of file"):
        list(stream_spans([Span("x", path, 4, 20)], torch.device("cpu"), chunk=8))


def test_pinned_path_copies_each_span_exactly_and_unpins_every_piece(tmp_path):
    data, spans = files(tmp_path)
    pins = Pins()
    got = list(stream_pinned(spans, torch.device("cpu"), pins.pin, pins.unpin, read, piece=64, ahead=2,
                             threads=2))
    check(got, spans, data)
    pins.settle()
    assert sorted(pins.unpinned) == sorted(address for address, _ in pins.pinned)
    assert all(nbytes <= 64 for _, nbytes in pins.pinned)
    # every piece a span touches was pinned once, however often spans come back to it (a: pieces 0-15 for x,
    # 31-35 for z, 0-1 again; b: 0-10 for y)
    assert len(pins.pinned) == len({address for address, _ in pins.pinned}) == 16 + 5 + 11
    # at most: the largest span's 16 pieces, 2 ahead, and pieces 0-1 kept for "again"
    assert pins.most <= 16 + 2 + 2, "pins ran far ahead of the copies"


def test_a_failed_pin_reads_the_rest_another_way(tmp_path):
    data, spans = files(tmp_path)
    pins = Pins(fail_at=20)  # x takes pins 0-15, y 16-26: y and what follows come from the fallback
    handed = []

    def fallback(rest):
        handed.append([span.key for span in rest])
        return read(rest)

    got = list(stream_pinned(spans, torch.device("cpu"), pins.pin, pins.unpin, fallback, piece=64, ahead=0,
                             threads=1))
    check(got, spans, data)
    assert handed == [["y", "z", "again"]]
    pins.settle()


def test_an_unmappable_file_reads_everything_another_way(tmp_path, monkeypatch):
    data, spans = files(tmp_path)

    def refuse(path):
        raise OSError("no map here")

    monkeypatch.setattr(staging, "_ReadOnlyMap", refuse)
    handed = []
    got = list(stream_pinned(spans, torch.device("cpu"), Pins().pin, Pins().unpin,
                             lambda rest: handed.append(len(rest)) or read(rest), piece=64))
    check(got, spans, data)
    assert handed == [len(spans)]


def test_pinned_path_past_the_end_is_an_error(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"0123456789")
    with pytest.raises(OSError, match="unexpected end of file"):
        list(stream_pinned([Span("x", path, 4, 20)], torch.device("cpu"), Pins().pin, Pins().unpin, read))


def test_load_through_the_pinned_path_gives_the_mapped_loads_tensors(tmp_path, monkeypatch):
    from oracle import save_reference_checkpoint, tiny_config

    folder = tmp_path / "ckpt"
    save_reference_checkpoint(folder, tiny_config())
    mapped = Kosmos2ForConditionalGeneration.from_pretrained(folder)
    pins = Pins()

    def pinned_spans(spans, device):
        return stream_pinned(spans, device, pins.pin, pins.unpin, read, piece=4096, ahead=1)

    monkeypatch.setattr(weights, "_streams", lambda model, device: True)
    monkeypatch.setattr(staging, "stream_spans", pinned_spans)
    streamed = Kosmos2ForConditionalGeneration.from_pretrained(folder)
    theirs = mapped.state_dict()
    for name, tensor in streamed.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    pins.settle()
    assert len(pins.pinned) > 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="registers pages with CUDA (no GPU here)")
def test_cuda_registration_gives_the_files_bytes(tmp_path):
    data, spans = files(tmp_path)
    big = tmp_path / "big.bin"
    content = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    big.write_bytes(content.numpy().tobytes())
    data[big] = big.read_bytes()
    spans = [*spans, Span("big", big, 12345, (3 << 20) - 12345), Span("head", big, 0, 1 << 20)]
    got = [(span, tensor.cpu()) for span, tensor in stream_spans(spans, torch.device("cuda"))]
    check(got, spans, data)
