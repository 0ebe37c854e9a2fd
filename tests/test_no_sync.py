"""On CUDA the row scheduler never makes the host wait for the device's queue: a refill or a harvest that copied
a small table with a plain `.to(device)` waited for every queued step to end, and the GPU then idled while the
host went on (the 20-100 ms gaps of the row scheduler's GPU timeline, benchmarks/RESULTS.md ninth run).

PyTorch's sync debug mode warns at every operation that synchronises with the device; the event waits the
scheduler means to make (the flags `lookahead` steps back, a harvest's copies) are not such operations.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch

import kosmos2_cli.generation.rows as rows_module
import kosmos2_cli.model.cache as cache_module

trained = pytest.importorskip("trained")

ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="synchronising with a GPU needs one")
ROWS = Path(rows_module.__file__).resolve()
WATCHED = {ROWS, Path(cache_module.__file__).resolve()}


def _answers(engine, prepared, spec, rows):
    return [engine.finish(started, spec).to_dict() for _, started in engine.stream(iter(prepared), spec, rows)]


def _tokens_of(record: dict) -> tuple:
    return record["image"], record["text"], [(e["phrase"], e["boxes"]) for e in record["entities"]]


def _run(trained_dir, device: str):
    """An engine on `device`, a spec and its prepared images: two phrases of different lengths make padded
    prompts (the model's image placement is then checked on the host)."""
    from oracle import fixture_images

    from kosmos2_cli.api.tasks import TaskSpec
    from kosmos2_cli.runtime.engine import PipelineEngine

    engine = PipelineEngine(trained_dir, device=device)
    spec = TaskSpec.build("ground", phrases=["a snowman", "a fire burning in the snow"])
    prepared = [engine.prepare(str(path), spec) for path in fixture_images()] * 2
    return engine, spec, prepared


def test_the_row_scheduler_moves_tables_to_the_device_queued(trained_dir, monkeypatch):
    """Where no GPU is: every host-to-device move the scheduler makes is queued (`non_blocking`), none waits.
    (A `.to(device)` or `torch.tensor(..., device=...)` in generation/rows.py fails this on any machine, and so
    does `table[rows] = False` there or in the cache: a Python number put at a tensor of places is copied over
    first, waiting.)"""
    waits, queued = [], []
    to, tensor, setitem = torch.Tensor.to, torch.tensor, torch.Tensor.__setitem__

    def from_rows() -> str | None:
        frame = sys._getframe(2)
        if frame.f_code.co_name == "_to":  # the helper: name its caller
            frame = frame.f_back
        return f"{frame.f_code.co_name}:{frame.f_lineno}" if Path(frame.f_code.co_filename).resolve() in WATCHED \
            else None

    def spy_to(self, *args, **kwargs):
        where = from_rows()
        moves = any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs
        if where and moves:
            (queued if kwargs.get("non_blocking") else waits).append(where)
        return to(self, *args, **kwargs)

    def spy_tensor(*args, **kwargs):
        where = from_rows()
        if where and kwargs.get("device") is not None:
            waits.append(where)
        return tensor(*args, **kwargs)

    def spy_setitem(self, index, value):
        where = from_rows()
        places = any(isinstance(i, torch.Tensor) for i in (index if isinstance(index, tuple) else (index,)))
        if where and places and isinstance(value, (bool, int, float)):
            waits.append(where)
        return setitem(self, index, value)

    engine, spec, prepared = _run(trained_dir, "cpu")
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    monkeypatch.setattr(torch, "tensor", spy_tensor)
    monkeypatch.setattr(torch.Tensor, "__setitem__", spy_setitem)
    answers = _answers(engine, prepared, spec, rows=4)
    monkeypatch.undo()
    assert len(answers) == len(prepared)
    assert waits == []
    assert {where.split(":")[0] for where in queued} >= {"_refill", "_harvest"}


@ON_CUDA
def test_the_row_scheduler_never_waits_for_the_device_queue(trained_dir):
    engine, spec, prepared = _run(trained_dir, "cuda")
    first = _answers(engine, prepared, spec, rows=4)  # kernels compiled, tables built, graphs captured:
    _answers(engine, prepared, spec, rows=4)  # the encoder's graph of a batch size is captured at its second use
    syncs: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):  # where, in this package, the synchronising call was made from
            ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                    if "kosmos2_cli" in f.filename]
            syncs.append(f"{Path(filename).name}:{lineno} <- " + " <- ".join(reversed(ours[-4:])))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            again = _answers(engine, prepared, spec, rows=4)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert syncs == []
    # The same answers (scores may differ in their last bits: the first run's image encodings ran eagerly)
    assert [_tokens_of(r) for r in again] == [_tokens_of(r) for r in first]
