"""`kosmos2 batch`'s first refill on a GPU: a few prompts that decode alone, so that their records come out before
the large refills pay their first-time costs. Checked on the CPU with the first batch switched on."""

from __future__ import annotations

from kosmos2_cli.api.options import GenerationOptions
from kosmos2_cli.api.tasks import TaskSpec
from kosmos2_cli.runtime.engine import FIRST_BATCH, PipelineEngine

IMAGES = ["snowman.png", "two_dogs.jpg", "corgi.jpg", "man_ball.png", "six_planes.png", "carnaby_street.jpg",
          "quadrocopter.jpg"]


def _run(engine: PipelineEngine, spec: TaskSpec, names: list[str], rows: int, monkeypatch) -> tuple[list, dict]:
    """The run's events in order (("encode", images) and ("answer", name)) and each image's record."""
    from kosmos2_cli.generation import decoder

    events: list[tuple[str, object]] = []
    encode = decoder.encode_images

    def logging_encode(model, pixel_values, *args, **kwargs):
        events.append(("encode", pixel_values.shape[0]))
        return encode(model, pixel_values, *args, **kwargs)

    monkeypatch.setattr(decoder, "encode_images", logging_encode)
    items = [engine.prepare(name, spec) for name in names]
    records = {}
    for item, started in engine.stream(iter(items), spec, rows):
        events.append(("answer", item.name))
        records[item.name] = engine.finish(started, spec).to_dict()
    monkeypatch.setattr(decoder, "encode_images", encode)
    return events, records


def test_the_first_refill_decodes_alone_and_the_records_stay_the_same(trained_dir, shared_fixtures, monkeypatch):
    names = [str(shared_fixtures / "images" / name) for name in IMAGES]
    spec = TaskSpec.build("caption")
    engine = PipelineEngine(trained_dir, "cpu", options=GenerationOptions(max_new_tokens=12))
    assert engine.first_batch is None and not engine.on_gpu  # on a CPU: no first batch by default
    plain_events, plain = _run(engine, spec, names, 4, monkeypatch)
    assert plain_events[0] == ("encode", 4)

    engine = PipelineEngine(trained_dir, "cpu", options=GenerationOptions(max_new_tokens=12))
    engine.first_batch = 2
    events, records = _run(engine, spec, names, 4, monkeypatch)
    assert events[:3] == [("encode", 2), ("answer", names[0]), ("answer", names[1])]  # nothing joined them
    assert sum(n for kind, n in events if kind == "encode") == len(names)
    assert [n for kind, n in events[3:] if kind == "encode"][0] == 4  # then the rows fill as before
    assert records == plain  # the same records, image for image
    again, _ = _run(engine, spec, names, 4, monkeypatch)
    assert again[0] == ("encode", 4)  # the engine's next stream starts warm: every row at once


def test_the_first_batch_fits_the_small_batch_fast_paths():
    """FlashAttention and the prompt's CUDA graph take batches up to 16: the first refill avoids cuDNN's start."""
    from kosmos2_cli.generation.decoder import GRAPHED_PREFILL_BATCH
    from kosmos2_cli.model.layers import FLASH_MAX_BATCH

    assert 1 < FIRST_BATCH <= min(FLASH_MAX_BATCH, GRAPHED_PREFILL_BATCH)


def test_kosmos2_batch_takes_the_first_batch_from_the_environment(trained_dir, shared_fixtures, tmp_path,
                                                                   monkeypatch):
    """KOSMOS2_FIRST_BATCH=2 on the CPU: the same records as without it; a value that is not a count is a
    one-line error."""
    import shutil

    from cli_helpers import invoke, json_lines

    folder = tmp_path / "in"
    folder.mkdir()
    for name in IMAGES[:5]:
        shutil.copy(shared_fixtures / "images" / name, folder / name)
    seen = []
    init = PipelineEngine.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append(self.first_batch)

    monkeypatch.setattr(PipelineEngine, "__init__", recording_init)
    runs = {}
    for value in ("", "2"):
        monkeypatch.setenv("KOSMOS2_FIRST_BATCH", value)
        out = tmp_path / f"out{value or 'default'}.jsonl"
        result = invoke(["batch", folder, "-o", out, "--model", trained_dir, "--device", "cpu", "--batch-size", "4",
                         "--max-new-tokens", "12", "--quiet"])
        assert result.exit_code == 0, result.output
        runs[value] = sorted(json_lines(out.read_text()), key=lambda record: record["image"])
    assert len(runs[""]) == 5 and runs["2"] == runs[""]
    assert seen == [None, 2]
    monkeypatch.setenv("KOSMOS2_FIRST_BATCH", "many")
    result = invoke(["batch", folder, "-o", tmp_path / "bad.jsonl", "--model", trained_dir, "--device", "cpu"])
    assert result.exit_code != 0
    assert "KOSMOS2_FIRST_BATCH must be a whole number" in result.output
    assert "Traceback" not in result.output
