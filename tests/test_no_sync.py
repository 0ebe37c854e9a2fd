"""On CUDA the row scheduler never makes the host wait for the device's queue: a refill or a harvest that copied
a small table with a plain `.to(device)` waited for every queued step to end, and the GPU then idled while the
host went on (the 20-100 ms gaps of the row scheduler's GPU timeline, benchmarks/RESULTS.md ninth run).

PyTorch's sync debug mode warns at every operation that synchronises with the device; the event waits the
scheduler means to make (the flags `lookahead` steps back, a harvest's copies) are not such operations.
"""

from __future__ import annotations

import warnings

import pytest
import torch

trained = pytest.importorskip("trained")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="synchronising with a GPU needs one")


def _answers(engine, prepared, spec, rows):
    return [engine.finish(started, spec).to_dict() for _, started in engine.stream(iter(prepared), spec, rows)]


def test_the_row_scheduler_never_waits_for_the_device_queue(trained_dir):
    from oracle import fixture_images

    from kosmos2_cli.api.tasks import TaskSpec
    from kosmos2_cli.runtime.engine import PipelineEngine

    engine = PipelineEngine(trained_dir, device="cuda")
    # Two phrases of different lengths: padded prompts (the model's image placement is checked on the host)
    spec = TaskSpec.build("ground", phrases=["a snowman", "a fire burning in the snow"])
    names = [str(path) for path in fixture_images()] * 2
    prepared = [engine.prepare(name, spec) for name in names]
    first = _answers(engine, prepared, spec, rows=4)  # graphs captured, kernels compiled, tables built
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            again = _answers(engine, prepared, spec, rows=4)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
    assert syncs == []
    assert again == first
