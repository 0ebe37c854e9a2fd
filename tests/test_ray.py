"""`kosmos2 batch --ray` (DESIGN §9) on a real local Ray cluster, started once for this module.

The runs are `kosmos2` processes that join the cluster as users' drivers do: two model actors give the same
records as plain `batch` (error records of bad images included) on the trained checkpoint; a driver stopped by
SIGTERM, then one SIGKILLed, then a rerun give every image exactly once; a model actor SIGKILLed mid-run is
restarted by Ray and the run ends with every image exactly once. Without Ray, `--ray` is a one-line error. The
driver's listing (folders, text lists, pyarrow URIs, the resume filter) is checked against plain batch's own
expansion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import (
    invoke,
    kosmos2_command,
    not_an_image,
    photo,
    random_checkpoint,
    run_kosmos2,
    save,
    subprocess_env,
    truncated_jpeg,
)

from kosmos2_cli.api.results import Failure
from kosmos2_cli.cli.errors import ExitCode

trained = pytest.importorskip("trained")


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A local Ray cluster for the module (4 logical CPUs: two CPU model actors and room to prepare images)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def ray_batch(address: str, *args, **env: str) -> subprocess.Popen:
    command = [*kosmos2_command(), "batch", *map(str, args), "--ray-address", address]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(**env))


def records(path: Path) -> list[dict]:
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def wait_for_lines(process: subprocess.Popen, out: Path, count: int, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {count} records in time: {process.poll()=}")


# -- the same records as plain batch ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both_runs(ray_address, trained_dir, tmp_path_factory):
    """The caption lessons' pictures, a text file and a truncated JPEG, through plain batch and through --ray
    with two model actors; one image per model call on both sides, so the arithmetic is the same."""
    folder = tmp_path_factory.mktemp("pictures")
    for lesson in trained.LESSONS:
        if lesson.task == "caption":
            (folder / lesson.image).write_bytes(lesson.path.read_bytes())
    not_an_image(folder / "notes.jpg")
    truncated_jpeg(folder / "cut.jpg")
    common = ["--model", trained_dir, "--max-new-tokens", str(trained.MAX_NEW_TOKENS), "--batch-size", "1"]
    plain_out, ray_out = folder.parent / "plain.jsonl", folder.parent / "ray.jsonl"
    plain = run_kosmos2(["batch", folder, "-o", plain_out, *common], timeout=300)  # one thread, as an actor
    before = set(_model_actors())
    process = ray_batch(ray_address, folder, "-o", ray_out, *common, "--ray-actors", "2", "--json")
    stdout, stderr = process.communicate(timeout=300)
    assert len(set(_model_actors()) - before) == 2  # the run had its two model actors
    return folder, plain, records(plain_out), process.returncode, stdout, stderr, records(ray_out)


def test_two_actors_give_plain_batchs_records(both_runs):
    folder, plain, plain_records, code, stdout, stderr, ray_records = both_runs
    assert plain.returncode == code == ExitCode.FAILED, stderr
    by_image = lambda rows: sorted(rows, key=lambda r: r["image"])  # noqa: E731 - --ray's order is any order
    assert by_image(ray_records) == by_image(plain_records)
    count = len(list(folder.iterdir()))
    assert len({r["image"] for r in ray_records}) == len(ray_records) == count > 4
    for record in ray_records:
        if "error" not in record:
            lesson = next(x for x in trained.LESSONS if x.task == "caption" and record["image"].endswith(x.image))
            assert record["raw"] == lesson.raw and record["text"] == trained.expected(lesson).caption
    summary = json.loads(stdout)
    assert (summary["images"], summary["processed"], summary["failed"], summary["done_before"]) == (count, count,
                                                                                                   2, 0)
    assert "Traceback" not in stderr
    # stderr: plain batch's lines (in any order), no Ray noise
    plain_lines = [line.replace("plain.jsonl", "ray.jsonl") for line in plain.stderr.splitlines()
                   if not line.startswith("done: ")]
    assert sorted(line for line in stderr.splitlines() if not line.startswith("done: ")) == sorted(plain_lines)


def test_bad_images_get_their_error_records(both_runs):
    folder, _, _, _, _, stderr, ray_records = both_runs
    errors = {Path(r["image"]).name: r for r in ray_records if "error" in r}
    assert errors["notes.jpg"] == {"image": str(folder / "notes.jpg"), "task": "caption", "detailed": False,
                                   "error": f"{folder / 'notes.jpg'}: not an image file (cannot identify image "
                                            "format)"}
    assert "truncated or corrupt image" in errors["cut.jpg"]["error"]
    assert f"error: {folder / 'notes.jpg'}: not an image file" in stderr
    assert f"2 of {len(list(folder.iterdir()))} images failed" in " ".join(stderr.split())


# -- killed driver, killed actor -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(shared_fixtures):
    return random_checkpoint()


def _photos(folder: Path, count: int) -> list[Path]:
    return [save(photo(40, 40, seed=n), folder / f"img{n:02d}.png") for n in range(count)]


SLOW = ["--max-new-tokens", "24", "--batch-size", "1"]  # random weights rarely stop: 24 tokens an image


def test_stopped_and_killed_driver_then_rerun_gives_every_image_once(ray_address, model, tmp_path):
    """SIGTERM stops the driver cleanly (exit 143, whole lines, the interrupted line); SIGKILL of the next run
    loses at most what was in flight; a third run finishes. The inputs are a text file of paths; records come
    back two at a time (KOSMOS2_RAY_BATCH=2)."""
    paths = _photos(tmp_path / "many", 30)
    listing = tmp_path / "paths.txt"
    listing.write_text("# the pictures\n" + "".join(f"{p}\n" for p in paths) + "\n")
    out = tmp_path / "out.jsonl"
    args = [listing, "-o", out, "--model", model, *SLOW, "--ray-actors", "2"]
    stopped = ray_batch(ray_address, *args, KOSMOS2_RAY_BATCH="2")
    wait_for_lines(stopped, out, 2)
    stopped.send_signal(signal.SIGTERM)
    _, stderr = stopped.communicate(timeout=60)
    assert stopped.returncode == ExitCode.TERMINATED, stderr
    data = out.read_bytes()
    assert data.endswith(b"\n") and "Traceback" not in stderr
    done = len(records(out))
    assert f"interrupted: {done} of 30 images are in {out} ({30 - done} to go)" in " ".join(stderr.split())
    killed = ray_batch(ray_address, *args, KOSMOS2_RAY_BATCH="2")
    wait_for_lines(killed, out, done + 2)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    written = records(out)
    assert done + 2 <= len(written) < 30, "the run ended before it could be killed"
    rerun = ray_batch(ray_address, *args, KOSMOS2_RAY_BATCH="2")
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"resuming: {len(written)} of 30 images are already in {out}" in " ".join(stderr.split())
    assert sorted(r["image"] for r in records(out)) == sorted(map(str, paths))  # each once
    assert all(r["text"] for r in records(out))


def _model_actors() -> dict[str, dict]:
    import ray

    return {actor_id: actor for actor_id, actor in ray._private.state.actors().items()
            if "ModelWorker" in actor.get("ActorClassName", "")}


def test_killed_actor_is_restarted_and_every_image_done_once(ray_address, model, tmp_path):
    """The inputs as a file:// URI (read through pyarrow's filesystems); one of the two actors is SIGKILLed
    once records flow: Ray restarts it, its images are done again, none is written twice."""
    paths = _photos(tmp_path / "many", 20)
    out = tmp_path / "out.jsonl"
    before = set(_model_actors())
    process = ray_batch(ray_address, (tmp_path / "many").as_uri(), "-o", out, "--model", model, *SLOW,
                        "--ray-actors", "2", KOSMOS2_RAY_BATCH="2")
    wait_for_lines(process, out, 2)
    alive = {i: a for i, a in _model_actors().items() if i not in before and a["State"] == "ALIVE"}
    victim_id, victim = sorted(alive.items())[0]
    os.kill(victim["Pid"], signal.SIGKILL)
    at_kill = len(records(out))
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert at_kill < 20, "the run ended before the actor could be killed"
    assert _model_actors()[victim_id]["NumRestarts"] >= 1  # Ray restarted the killed actor
    names = [r["image"] for r in records(out)]
    assert sorted(names) == sorted(p.as_uri() for p in paths)  # each once
    assert "Traceback" not in stderr


# -- without Ray; options --------------------------------------------------------------------------------------


def test_without_ray_the_option_says_how_to_install_it(tmp_path):
    save(photo(), tmp_path / "a.png")
    out = tmp_path / "out.jsonl"
    blocked = "import sys; sys.modules['ray'] = None; sys.modules['ray.data'] = None; "
    command = [sys.executable, "-c", blocked + "from kosmos2_cli.cli.app import main; sys.argv[0] = 'kosmos2'; main()",
               "batch", str(tmp_path / "a.png"), "-o", str(out), "--ray"]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == ExitCode.USAGE
    lines = result.stderr.strip().splitlines()
    assert lines == ['error: Ray is not installed; install it with pip install "kosmos2-cli[ray]", or run without '
                     '--ray'], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--ray-address", "nowhere"], "--ray-address 'nowhere': not auto, local or a cluster address"),
    (["--ray-actors", "2"], "--ray-actors applies with --ray only"),
    (["--ray", "--annotate-dir", "drawn"], "--annotate-dir does not go with --ray"),
])
def test_option_mistakes_are_one_line_usage_errors(tmp_path, args, message):
    save(photo(), tmp_path / "a.png")
    result = invoke(["batch", tmp_path / "a.png", "-o", tmp_path / "out.jsonl", *args])
    assert result.exit_code == ExitCode.USAGE
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


# -- the driver's listing --------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a/x.png", "a/y.JPG", "a/sub/z.png", "a/.hidden.png", "b/w.webp"):
        save(photo(8, 8), tmp_path / name)
    not_an_image(tmp_path / "a" / "notes.txt")
    return tmp_path


def test_listing_matches_plain_batchs_expansion(tree):
    from kosmos2_cli.distributed.listing import list_inputs
    from kosmos2_cli.runtime.inputs import expand_inputs

    for inputs in (["a"], ["a/sub", "a", "a/x.png"], ["a/*.png", "b", "a"], ["b/w.webp", "b/*"]):
        assert list_inputs(inputs).names.to_pylist() == expand_inputs(inputs), inputs


def test_listing_of_uris_and_text_lists(tree):
    from kosmos2_cli.distributed.listing import list_inputs
    from kosmos2_cli.runtime.inputs import InputError

    uri = (tree / "a").as_uri()
    assert list_inputs([uri]).names.to_pylist() == [f"{uri}/x.png", f"{uri}/y.JPG", f"{uri}/sub/z.png"]
    (tree / "list.txt").write_text("a/x.png\n\n# a comment\n  missing.jpg  \na/x.png\n" + f"{uri}/y.JPG\n")
    assert list_inputs(["list.txt"]).names.to_pylist() == ["a/x.png", "missing.jpg", f"{uri}/y.JPG"]
    for bad, words in ((["nothere"], "no such file or directory"), ([(tree / "nope").as_uri()], "no such file"),
                       (["empty.txt"], "no images in it")):
        (tree / "empty.txt").write_text("\n")
        with pytest.raises(InputError, match=words):
            list_inputs(bad)


def test_pending_drops_what_the_output_file_holds(tree):
    from kosmos2_cli.api.tasks import TaskSpec, spec_key
    from kosmos2_cli.distributed.listing import list_inputs

    listing = list_inputs(["a", "b"])
    caption, detailed = TaskSpec.build("caption"), TaskSpec.build("caption", detailed=True)
    done = {spec_key(caption, "a/x.png"), spec_key(detailed, "b/w.webp"), spec_key(caption, "elsewhere.png")}
    assert listing.pending(done, caption).to_pylist() == ["a/y.JPG", "a/sub/z.png", "b/w.webp"]
    assert listing.pending(done, detailed).to_pylist() == ["a/x.png", "a/y.JPG", "a/sub/z.png"]
    assert listing.count_in(done, caption) == 1


def test_a_uri_is_prepared_as_its_file_is(tree, model):
    """The CPU stage reads a URI through pyarrow and prepares it with plain batch's code: the same pixels, and
    the same error words naming the URI."""
    import numpy as np
    import pyarrow as pa

    from kosmos2_cli.api.options import GenerationOptions
    from kosmos2_cli.api.tasks import TaskSpec
    from kosmos2_cli.distributed.stages import Job, prepare_batch

    job = Job(TaskSpec.build("caption"), str(model), str(model), None, "cpu", "auto", GenerationOptions())
    names = ["a/x.png", (tree / "a/x.png").as_uri(), (tree / "a/notes.txt").as_uri()]
    rows = prepare_batch(pa.table({"image": names}), job)
    assert np.array_equal(rows["pixels"][0], rows["pixels"][1]) and rows["pixels"][0].std() > 0
    assert list(rows["error"][:2]) == ["", ""] and (rows["width"][1], rows["height"][1]) == (8, 8)
    assert rows["error"][2] == f"{names[2]}: not an image file (cannot identify image format)"


def test_a_workers_error_is_told_by_its_root_cause():
    from kosmos2_cli.distributed.driver import _worker_error

    report = ("ray.exceptions.ActorDiedError: The actor died because of an error raised in its creation task\n"
              "  File \"engine.py\", line 262, in _loading\n    raise ModelLoadError(message)\n"
              "ValueError: unknown dtype 'x'\n\nThe above exception was the direct cause of the following exception:\n"
              "kosmos2_cli.runtime.engine.ModelLoadError: /models/k2: unknown dtype 'x'\n")
    assert _worker_error(RuntimeError(report)) == ("ModelLoadError", "/models/k2: unknown dtype 'x'")
    assert _worker_error(RuntimeError("no pattern here")) == ("RuntimeError", "no pattern here")


def test_retry_failed_picks_this_querys_error_records_of_listed_images(tree):
    from kosmos2_cli.api.tasks import TaskSpec
    from kosmos2_cli.cli.commands.batch_ray import retry_predicate
    from kosmos2_cli.distributed.listing import list_inputs

    caption, ask = TaskSpec.build("caption"), TaskSpec.build("ask", question="Why?")
    failed = [caption.failure_record(Failure("a/x.png", "bad", "caption")),
              ask.failure_record(Failure("a/y.JPG", "bad", "ask")),
              caption.failure_record(Failure("elsewhere.png", "bad", "caption"))]
    out = tree / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in failed) + '{"image": "a/sub/z.png", "task": "caption"}\n')
    pick = retry_predicate(caption, out, list_inputs(["a"]))
    assert [pick(r) for r in failed] == [True, False, False]
