"""`kosmos2 batch` (DESIGN §6): one line per image, error records, resume without duplicates, interruption by
SIGINT, SIGTERM and SIGKILL, --retry-failed, --overwrite, annotations, out-of-memory, progress."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time

import pytest
from cli_helpers import (
    FAST,
    batch_modes,  # noqa: F401  (fixture)
    bomb_png,
    invoke,
    kosmos2_command,
    not_an_image,
    photo,
    quick,  # noqa: F401  (fixture)
    random_checkpoint,
    rotated_jpeg,
    save,
    subprocess_env,
    truncated_jpeg,
)

from kosmos2_cli.cli.errors import ExitCode

pytestmark = pytest.mark.usefixtures("quick")


@pytest.fixture(scope="module")
def model(shared_fixtures):
    return random_checkpoint()


@pytest.fixture
def mixed(tmp_path):
    """Four good images (one EXIF-rotated, one in a subfolder with an upper-case extension), three bad ones and
    files that are not inputs (hidden, not an image extension)."""
    folder = tmp_path / "photos"
    save(photo(64, 48, seed=1), folder / "a.png")
    save(photo(48, 64, seed=2), folder / "b.jpg")
    rotated_jpeg(folder / "c.jpeg")
    save(photo(30, 30, seed=3), folder / "sub" / "D.PNG")
    truncated_jpeg(folder / "sub" / "truncated.jpg")
    not_an_image(folder / "text.jpg")
    bomb_png(folder / "bomb.png")
    save(photo(), folder / ".hidden.png")
    not_an_image(folder / "notes.txt")
    return folder


GOOD = {"a.png", "b.jpg", "c.jpeg", "sub/D.PNG"}
BAD = {"sub/truncated.jpg": "truncated or corrupt image", "text.jpg": "not an image file",
       "bomb.png": "image too large"}


def batch(model, *args):
    return invoke(["batch", *args, "--model", model, *FAST])


def lines(path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def by_image(records, root) -> dict[str, dict]:
    names = [os.path.relpath(r["image"], root) for r in records]
    assert len(names) == len(set(names)), "an image appears twice"
    return dict(zip(names, records, strict=True))


def test_folder_with_good_and_bad_images(model, mixed, tmp_path):
    out = tmp_path / "out.jsonl"
    result = batch(model, mixed, "-o", out, "--task", "caption", "--batch-size", "2")
    assert result.exit_code == ExitCode.FAILED
    records = by_image(lines(out), mixed)
    assert set(records) == GOOD | set(BAD)
    for name in GOOD:
        assert records[name]["task"] == "caption" and records[name]["text"].startswith("An image of")
    assert (records["c.jpeg"]["width"], records["c.jpeg"]["height"]) == (60, 120)
    for name, reason in BAD.items():
        assert set(records[name]) == {"image", "error", "task", "detailed"} and reason in records[name]["error"]
        assert f"error: {records[name]['error']}" in " ".join(result.stderr.split())
    assert "error: 3 of 7 images failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_images_prepared_in_worker_processes(model, mixed, tmp_path, monkeypatch):
    """The process pool (used for long runs on many cores) gives the same records, failures included."""
    monkeypatch.setenv("KOSMOS2_PREPARE", "threads")
    threads = batch(model, mixed, "-o", tmp_path / "threads.jsonl", "--workers", "2")
    monkeypatch.setenv("KOSMOS2_PREPARE", "processes")
    processes = batch(model, mixed, "-o", tmp_path / "processes.jsonl", "--workers", "2")
    assert threads.exit_code == processes.exit_code == ExitCode.FAILED
    assert lines(tmp_path / "threads.jsonl") == lines(tmp_path / "processes.jsonl")


def test_task_defaults_to_caption(model, tmp_path):
    folder = tmp_path / "photos"
    save(photo(), folder / "one.png")
    out = tmp_path / "captions.jsonl"
    result = batch(model, folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    [record] = lines(out)
    assert record["task"] == "caption" and record["prompt"] == "<grounding> An image of"


def test_rerun_resumes_and_other_tasks_do_not_skip(model, mixed, tmp_path):
    out = tmp_path / "out.jsonl"
    batch(model, mixed, "-o", out, "-t", "caption")
    before = out.read_bytes()
    again = batch(model, mixed, "-o", out, "-t", "caption")
    assert again.exit_code == ExitCode.FAILED  # the file still holds failed images
    assert out.read_bytes() == before
    assert "nothing to do: all 7 images are already in" in again.stderr
    assert "3 in earlier runs; --retry-failed retries them" in again.stderr
    ask = batch(model, mixed / "a.png", "-o", out, "-t", "ask", "--question", "Why?")
    assert ask.exit_code == 0
    detailed = batch(model, mixed / "a.png", "-o", out, "-t", "caption", "--detailed")
    assert detailed.exit_code == 0
    tasks = [(os.path.basename(r["image"]), r["task"], r.get("detailed")) for r in lines(out)]
    assert tasks.count(("a.png", "caption", False)) == 1
    assert tasks[-2:] == [("a.png", "ask", None), ("a.png", "caption", True)]


def test_partial_last_line_is_completed(model, mixed, tmp_path):
    out = tmp_path / "out.jsonl"
    batch(model, mixed, "-o", out, "-t", "caption")
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:3]) + text[3][: len(text[3]) // 2])  # as a kill in mid-write would leave it
    result = batch(model, mixed, "-o", out, "-t", "caption")
    assert "cut off a partial last line" in result.stderr
    assert "resuming: 3 of 7 images are already in" in result.stderr
    assert set(by_image(lines(out), mixed)) == GOOD | set(BAD)


def test_retry_failed_and_overwrite(model, mixed, tmp_path):
    out = tmp_path / "out.jsonl"
    batch(model, mixed, "-o", out, "-t", "caption")
    (mixed / "text.jpg").unlink()
    save(photo(20, 20), mixed / "text.jpg")  # fixed meanwhile
    retried = batch(model, mixed, "-o", out, "-t", "caption", "--retry-failed")
    assert "removed 3 error record(s) to retry them" in retried.stderr
    records = by_image(lines(out), mixed)
    assert "error" not in records["text.jpg"] and "error" in records["bomb.png"]
    assert retried.exit_code == ExitCode.FAILED and "2 of 7 images failed" in retried.stderr
    fresh = batch(model, mixed / "a.png", "-o", out, "-t", "caption", "--overwrite")
    assert fresh.exit_code == 0 and len(lines(out)) == 1


def test_ground_batch_records(model, mixed, tmp_path):
    out = tmp_path / "ground.jsonl"
    result = batch(model, mixed / "a.png", mixed / "b.jpg", "-o", out, "-t", "ground", "-p", "a dog", "-p", "a cat",
                   "--json")
    assert result.exit_code == 0
    records = lines(out)
    assert [list(r["found"]) for r in records] == [["a dog", "a cat"]] * 2
    assert all(r["phrases"] == ["a dog", "a cat"] for r in records)
    summary = json.loads(result.stdout)
    assert summary == {**summary, "output": str(out), "images": 2, "processed": 2, "failed": 0,
                       "interrupted": None}


def test_annotate_dir_is_written_and_never_read_back(model, mixed, tmp_path):
    out = tmp_path / "out.jsonl"
    drawn = mixed / "drawn"
    result = batch(model, mixed, "-o", out, "-t", "caption", "--annotate-dir", drawn)
    assert result.exit_code == ExitCode.FAILED
    for name in GOOD:
        assert (drawn / os.path.relpath(mixed / name, mixed)).exists() or any(drawn.rglob(os.path.basename(name)))
    again = batch(model, mixed, "-o", out, "-t", "caption", "--annotate-dir", drawn)
    assert "nothing to do: all 7 images" in again.stderr  # drawn/ is not taken as input


@pytest.mark.parametrize("args, message", [
    (["-t", "caption", "-p", "x"], "--phrase do(es) not apply to --task caption"),
    (["-t", "ground"], "ground needs at least one phrase; give one with --phrase"),
    (["-t", "ask"], "ask needs a question"),
    (["-t", "refer", "--box", "1,2"], "must be four numbers"),
    (["-t", "caption", "--overwrite", "--retry-failed"], "do not go together"),
])
def test_batch_usage_errors(model, mixed, tmp_path, args, message):
    result = batch(model, mixed, "-o", tmp_path / "o.jsonl", *args)
    assert result.exit_code == ExitCode.USAGE and message in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_foreign_output_file_is_left_alone(model, mixed, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text("not json\n")
    result = batch(model, mixed, "-o", notes, "-t", "caption")
    assert result.exit_code == ExitCode.USAGE and "line 1 is not a JSON record" in result.stderr
    assert notes.read_text() == "not json\n"


@pytest.mark.usefixtures("batch_modes")
def test_out_of_memory_in_a_batch(model, mixed, tmp_path, monkeypatch):
    import torch

    from kosmos2_cli.api.pipeline import Kosmos2

    encode = Kosmos2.encode_pixels

    def tight(self, pixels):
        if len(pixels) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return encode(self, pixels)

    monkeypatch.setattr(Kosmos2, "encode_pixels", tight)
    out = tmp_path / "out.jsonl"
    result = batch(model, mixed, "-o", out, "-t", "caption", "--batch-size", "4")
    assert "out of device memory with 4 images per batch; going on with 2" in result.stderr
    assert set(by_image(lines(out), mixed)) == GOOD | set(BAD)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
@pytest.mark.usefixtures("batch_modes")
def test_interrupt_in_process_keeps_whole_lines(model, mixed, tmp_path, monkeypatch, signal_name):
    from kosmos2_cli.api.pipeline import Kosmos2

    encode = Kosmos2.encode_pixels
    calls = []

    def interrupted_on_third(self, pixels):  # the third batch (static) or refill of rows (continuous)
        calls.append(len(pixels))
        if len(calls) == 3:
            os.kill(os.getpid(), getattr(signal, signal_name))  # a real signal, handled in this process
            time.sleep(1)
        return encode(self, pixels)

    monkeypatch.setattr(Kosmos2, "encode_pixels", interrupted_on_third)
    out = tmp_path / "out.jsonl"
    result = batch(model, mixed, "-o", out, "-t", "caption", "--batch-size", "1")
    assert result.exit_code == (ExitCode.TERMINATED if signal_name == "SIGTERM" else ExitCode.INTERRUPTED)
    written = lines(out)
    assert f"interrupted: {len(written)} of 7 images are in {out}" in " ".join(result.stderr.split())
    monkeypatch.setattr(Kosmos2, "encode_pixels", encode)
    batch(model, mixed, "-o", out, "-t", "caption")
    assert set(by_image(lines(out), mixed)) == GOOD | set(BAD)


@pytest.mark.parametrize("how, code, prepare", [("SIGKILL", -signal.SIGKILL, "threads"), ("SIGINT", 130, "threads"),
                                                ("SIGKILL", -signal.SIGKILL, "processes")])
def test_interrupted_process_leaves_a_file_a_rerun_completes(model, tmp_path, how, code, prepare):
    """Also with images prepared in worker processes: they die with a killed run (else they would hold its
    output pipes open, and this test would time out)."""
    folder = tmp_path / "many"
    for n in range(16):
        save(photo(40, 40, seed=n), folder / f"img{n:02d}.png")
    out = tmp_path / "out.jsonl"
    command = [*kosmos2_command(), "batch", str(folder), "-o", str(out), "-t", "caption", "--model", str(model),
               "--max-new-tokens", "24", "--batch-size", "1", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=subprocess_env(KOSMOS2_PREPARE=prepare))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    data = out.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    assert all(json.loads(line)["text"] for line in whole.splitlines())  # every whole line is a record
    if how != "SIGKILL":
        assert data == whole  # a clean stop leaves no partial line
        assert "Traceback" not in stderr
        assert f"interrupted: {len(whole.splitlines())} of 16 images are in {out}" in " ".join(stderr.split())
    assert len(whole.splitlines()) < 16, "the run ended before it could be interrupted"
    rerun = invoke(["batch", folder, "-o", out, "-t", "caption", "--model", model, "--max-new-tokens", "24"])
    assert rerun.exit_code == 0, rerun.stderr
    names = sorted(os.path.basename(r["image"]) for r in lines(out))
    assert names == [f"img{n:02d}.png" for n in range(16)]


def test_progress_bar_shows_rate_and_eta():
    from rich.console import Console

    from kosmos2_cli.cli.render import Reporter

    reporter = Reporter()
    buffer = io.StringIO()
    reporter.err = Console(file=buffer, force_terminal=True, width=120)
    with reporter.progress(10, "caption") as progress:
        assert progress is not None
        time.sleep(0.05)
        progress.update(progress.task_ids[0], advance=4)
        progress.refresh()
    shown = buffer.getvalue()
    assert "img/s" in shown and "ETA" in shown and "4/10" in shown
    quiet = Reporter(quiet=True)
    with quiet.progress(10, "caption") as nothing:
        assert nothing is None
