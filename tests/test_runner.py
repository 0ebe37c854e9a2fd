"""The runner against a fake engine: order, failures in place, batches, out-of-memory halving, prefetch."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kosmos2_cli.api.results import Failure, Result
from kosmos2_cli.api.tasks import TaskSpec
from kosmos2_cli.processing.images import ImageLoadError
from kosmos2_cli.runtime.engine import Prepared
from kosmos2_cli.runtime.runner import Runner

SPEC = TaskSpec.build("caption")


class FakeEngine:
    """Rows of images in flight, each ending after as many steps as its name's number (default 1). Names
    starting with 'bad' fail to load, 'crash' break the preprocessing; more than `fits` rows, or an image in
    `oom_always`, run out of memory."""

    on_gpu = False

    def __init__(self, fits: int = 100, oom_always: set[str] = frozenset(), delay: float = 0.0) -> None:
        self.fits = fits
        self.oom_always = oom_always
        self.delay = delay
        self.runs: list[int] = []  # the rows of each stream
        self.batches: list[list[str]] = []  # the images admitted together
        self.prepared: list[str] = []
        self.threads: set[str] = set()
        self.model_threads: set[str] = set()
        self.events: list[str] = []
        self.freed = 0

    def prepare(self, name: str, spec: TaskSpec) -> Prepared:
        self.threads.add(threading.current_thread().name)
        self.prepared.append(name)
        if name.startswith("bad"):
            raise ImageLoadError(f"{name}: not an image file")
        if name.startswith("crash"):
            raise RuntimeError("weird pixels")
        time.sleep(self.delay)
        return Prepared(name, None, None)

    def worker_setup(self):
        raise AssertionError("no worker processes here")

    def rows_that_fit(self, share: float = 0.4) -> int:
        return self.fits

    def load(self) -> None:
        self.events.append("load")
        self.model_threads.add(threading.current_thread().name)

    def stream(self, items, spec, rows, calm=None, pace=None):
        self.runs.append(rows)
        self.events.append("stream")
        self.model_threads.add(threading.current_thread().name)
        if rows > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        flight: list[list] = []  # [steps left, item]
        items = iter(items)
        while True:
            admitted = []
            while len(flight) < rows and (pace is None or pace.ready(not flight)) and (
                    item := next(items, None)) is not None:
                if item.name in self.oom_always:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory")
                flight.append([int(item.name.lstrip("abcdefghijklmnopqrstuvwxyz") or 1), item])
                admitted.append(item.name)
            if admitted:
                self.batches.append(admitted)
            if not flight:
                return
            for entry in flight:
                entry[0] -= 1
            for entry in [e for e in flight if e[0] <= 0]:
                flight.remove(entry)
                yield entry[1], entry[1].name.upper()

    def finish(self, started, spec):
        return Result(started.lower(), 1, 1, spec.task, "", started, [], "")

    def free_memory(self):
        self.freed += 1


def _run(engine, names, **kwargs):
    notices = []
    runner = Runner(engine, SPEC, notice=notices.append, **kwargs)
    outcomes = [outcome for outcome, _ in runner.run(names)]
    return outcomes, notices, runner


def test_outcomes_in_input_order_with_failures_in_place():
    names = ["a", "bad1", "b5", "c", "crash", "d9", "bad2", "e2"]
    outcomes, _, _ = _run(FakeEngine(), names, batch_size=2, workers=3)
    assert [o.image for o in outcomes] == names
    kinds = ["F" if isinstance(o, Failure) else "R" for o in outcomes]
    assert kinds == ["R", "F", "R", "R", "F", "R", "F", "R"]
    assert outcomes[1].error == "bad1: not an image file"
    assert outcomes[4].error == "crash: cannot prepare the image (RuntimeError: weird pixels)"


def test_rows_hold_batch_size_images_and_refill_as_they_end():
    engine = FakeEngine()
    outcomes, _, _ = _run(engine, ["i1", "i5", "i1", "i2", "i1", "i1", "i1"], batch_size=3, workers=2)
    assert engine.runs == [3]
    assert engine.batches[0] == ["i1", "i5", "i1"] and sum(len(b) for b in engine.batches) == 7
    assert len(engine.batches) > 2  # rows that ended took the next images while i5 went on
    assert [o.text for o in outcomes] == ["I1", "I5", "I1", "I2", "I1", "I1", "I1"]


def test_preparation_runs_on_worker_threads_and_the_model_on_its_own():
    engine = FakeEngine()
    _run(engine, [f"i{n}" for n in range(6)], batch_size=2, workers=2)
    assert engine.threads and all(name.startswith("kosmos2-prepare") for name in engine.threads)
    assert engine.model_threads == {"kosmos2-model"}
    assert engine.events == ["load", "stream"]  # the weights load first, on the model thread


def test_out_of_memory_halves_the_rows_and_restarts_what_was_in_flight():
    engine = FakeEngine(fits=2)
    names = [f"i{n % 4 + 1}" for n in range(9)]
    outcomes, notices, runner = _run(engine, names, batch_size=8, workers=2)
    assert [o.text for o in outcomes] == [n.upper() for n in names]
    assert engine.runs == [8, 4, 2] and runner.batch_size == 2
    assert notices == ["out of device memory with 8 images per batch; going on with 4",
                       "out of device memory with 4 images per batch; going on with 2"]
    assert engine.freed == 2


def test_an_image_that_does_not_fit_alone_fails_alone():
    engine = FakeEngine(oom_always={"huge"})
    outcomes, _, runner = _run(engine, ["a", "huge", "b"], batch_size=4, workers=1)
    assert [type(o).__name__ for o in outcomes] == ["Result", "Failure", "Result"]
    assert "out of device memory even alone" in outcomes[1].error
    assert runner.batch_size == 1


def test_other_errors_are_not_swallowed():
    class Broken(FakeEngine):
        def stream(self, items, spec, rows, calm=None, pace=None):
            raise ValueError("a bug")
            yield

    with pytest.raises(ValueError, match="a bug"):
        _run(Broken(), ["a"], batch_size=1)


def test_prefetch_is_bounded():
    """A slow consumer does not make the workers decode the whole input ahead."""
    engine = FakeEngine()
    runner = Runner(engine, SPEC, batch_size=2, workers=2, prefetch=4)
    stream = runner.run([f"i{n}" for n in range(50)])
    next(stream)
    time.sleep(0.2)
    assert len(engine.prepared) <= 2 + 4 + 2 + 2
    stream.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="staging copies pixels to a GPU (none here)")
def test_collated_pixels_are_staged_on_the_gpu_unchanged(trained_dir):
    """On a GPU the runner's thread collates a batch and starts its copy on a side stream; the model thread
    takes the pixels after its stream waited for the copy. They arrive bit for bit."""
    import numpy as np
    from oracle import fixture_images

    from kosmos2_cli.runtime.engine import PipelineEngine
    from kosmos2_cli.runtime.stager import Staged

    engine = PipelineEngine(trained_dir, device="cuda")
    prepared = [engine.prepare(str(path), SPEC) for path in fixture_images()[:3]]
    staged = engine.collate(prepared)
    assert isinstance(staged, Staged)
    pixels = staged.take()
    assert pixels.is_cuda
    want = torch.from_numpy(np.concatenate([item.inputs for item in prepared]))
    assert torch.equal(pixels.cpu(), want)


def test_default_batch_size_follows_the_gpu_memory(monkeypatch, trained_dir):
    """With no --batch-size: 8 on a CPU; on a GPU the largest power of two (8..256) whose key/value cache and
    activations fit in 40% of the free memory, the weights counted out until they are loaded."""
    from kosmos2_cli.api.pipeline import GenerationOptions
    from kosmos2_cli.model.config import Kosmos2Config
    from kosmos2_cli.runtime.engine import PipelineEngine
    from kosmos2_cli.runtime.runner import default_batch_size

    engine = PipelineEngine(trained_dir, device="cpu")
    assert default_batch_size(engine) == 8
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    monkeypatch.setattr(PipelineEngine, "on_gpu", property(lambda self: True))
    engine = PipelineEngine(trained_dir, device="cpu", dtype="bfloat16", options=GenerationOptions(max_new_tokens=128))
    text = Kosmos2Config.from_json_file(trained_dir / "config.json").text_config
    per_row = 2 * text.layers * text.embed_dim * 256 * 2 + (8 << 20)  # 96 + 128 slots round up to 256
    weights = 1_664_000_000 * 2
    for rows, want in ((10_000, 256), (300, 256), (255, 128), (100, 64), (20, 16), (0, 8)):
        free["bytes"] = weights + int(rows * per_row / 0.4) + per_row // 2
        assert default_batch_size(engine) == want, rows


def test_default_batch_size_leaves_bad_settings_to_the_model_load(trained_dir, monkeypatch):
    """--dtype int8 with a GPU cannot be sized: the default falls back to 64 and the load gives the error."""
    from kosmos2_cli.runtime.engine import PipelineEngine
    from kosmos2_cli.runtime.runner import default_batch_size

    monkeypatch.setattr(PipelineEngine, "on_gpu", property(lambda self: True))
    assert default_batch_size(PipelineEngine(trained_dir, device="cuda", dtype="int8")) == 64


def test_preloaded_weights_load_on_their_own_thread_and_answer_the_same(trained_dir, monkeypatch):
    """`preload` (what the commands use) loads the weights on a thread of its own from the engine's start, beside
    the tokenizer; the records are those of weights loaded when the run wants them."""
    from oracle import fixture_images

    from kosmos2_cli.api.models import Kosmos2ForConditionalGeneration
    from kosmos2_cli.runtime.engine import PipelineEngine

    names = [str(path) for path in fixture_images()[:3]]
    threads = []
    load = Kosmos2ForConditionalGeneration.from_pretrained.__func__

    def recorded(cls, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Kosmos2ForConditionalGeneration, "from_pretrained", classmethod(recorded))
    records = {}
    for preload in (False, True):
        engine = PipelineEngine(trained_dir, device="cpu", dtype="float32", preload=preload)
        outcomes = [outcome for outcome, _ in Runner(engine, SPEC, batch_size=2).run(names)]
        records[preload] = [outcome.to_dict() for outcome in outcomes]
    assert threads == ["kosmos2-model", "kosmos2-load"]
    assert records[True] == records[False] and len(records[True]) == 3


def test_a_preload_that_fails_raises_where_the_weights_are_wanted(trained_dir, tmp_path):
    """A broken weights file does not fail the engine's construction on another thread unseen: the run that
    needs the weights gets the ModelLoadError naming the folder."""
    import shutil

    from kosmos2_cli.runtime.engine import ModelLoadError, PipelineEngine

    broken = tmp_path / "broken"
    shutil.copytree(trained_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    engine = PipelineEngine(broken, device="cpu", preload=True)
    with pytest.raises(ModelLoadError, match="broken"):
        engine.load()


def test_a_preloaded_engine_sizes_its_batch_by_the_memory_free_before_the_weights(trained_dir, monkeypatch):
    """The batch size is chosen while the weights may still be coming in: it counts from the free memory
    measured before they did, less their size, not from whatever part of them has arrived."""
    from kosmos2_cli.runtime.engine import PipelineEngine
    from kosmos2_cli.runtime.runner import default_batch_size

    free = {"bytes": 80 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    monkeypatch.setattr(PipelineEngine, "on_gpu", property(lambda self: True))
    lazy = PipelineEngine(trained_dir, device="cpu", dtype="bfloat16")
    want = default_batch_size(lazy)
    engine = PipelineEngine(trained_dir, device="cpu", dtype="bfloat16", preload=True)
    engine.load()
    free["bytes"] = 1 << 30  # the weights and more taken since
    assert default_batch_size(engine) == want == 256
