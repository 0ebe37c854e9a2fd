"""`kosmos2 serve` end to end on the trained tiny checkpoint: real uvicorn servers on loopback, real HTTP.

Every task's answer must be the record `kosmos2 TASK IMAGE --json` prints for the same picture and arguments, key
for key; every bad input of DESIGN §8 gets its status and the CLI's message; concurrency (a burst with a bad
image, 32 clients x 8 requests, a client that goes away, out of memory, SIGTERM) never changes an answer.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cli_helpers import (
    bomb_png,
    invoke,
    kosmos2_command,
    not_an_image,
    random_checkpoint,
    subprocess_env,
    truncated_jpeg,
)
from oracle import IMAGES
from serve_helpers import (
    TOKEN,
    cases,
    cli_error,
    cli_records,
    free_port,
    metric,
    post,
    request,
    same_record,
    serve_in_process,
    serve_subprocess,
    wait_healthy,
)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
trained = pytest.importorskip("trained")

NEW_TOKENS = trained.MAX_NEW_TOKENS
CASES = cases(trained.LESSONS)
UPLOAD_MB = 4  # above every demo picture (six_planes.png: 3.6 MB)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expected(trained_dir):
    return cli_records(trained_dir, IMAGES, CASES, NEW_TOKENS)


@pytest.fixture(scope="module")
def server(trained_dir):
    with serve_subprocess(trained_dir, "--max-new-tokens", str(NEW_TOKENS), "--max-rows", "16", "--max-queue",
                          "512", "--max-upload-mb", str(UPLOAD_MB), "--quiet") as (base, _):
        yield base


def _image(name: str) -> tuple[str, bytes]:
    return name, (IMAGES / name).read_bytes()


def _ask(base: str, case) -> dict:
    reply = post(base, case.task, _image(case.image), case.fields)
    assert reply.status == 200, reply.body
    return reply.body


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.key)
def test_every_task_answers_the_clis_record(server, expected, case):
    assert same_record(_ask(server, case), expected[case.key])


def test_json_with_base64_is_the_same_record(server, expected):
    case = next(c for c in CASES if c.task == "ground")
    body = {"image_base64": base64.b64encode((IMAGES / case.image).read_bytes()).decode(), "filename": case.image,
            "phrases": [value for _, value in case.fields]}
    reply = request(f"{server}/v1/ground", json.dumps(body).encode(), "application/json")
    assert reply.status == 200, reply.body
    assert same_record(reply.body, expected[case.key])


def _bad_files(tmp):
    return {"notes.txt": not_an_image(tmp / "notes.txt"), "cut.jpg": truncated_jpeg(tmp / "cut.jpg"),
            "bomb.png": bomb_png(tmp / "bomb.png")}


@pytest.mark.parametrize("name", ["notes.txt", "cut.jpg", "bomb.png"])
def test_bad_pictures_get_400_with_the_clis_message(server, trained_dir, tmp_path, name):
    path = _bad_files(tmp_path)[name]
    reply = post(server, "caption", (name, path.read_bytes()))
    assert reply.status == 400
    assert reply.body == {"error": cli_error(trained_dir, tmp_path, ["caption", name])}
    assert {"notes.txt": "not an image file", "cut.jpg": "truncated or corrupt", "bomb.png": "too large"}[name] in \
        reply.body["error"]


@pytest.mark.parametrize("task, fields, cli", [
    ("refer", [("box", "1,2,3")], ["--box", "1,2,3"]),
    ("refer", [("box", "10,10,2000,20")], ["--box", "10,10,2000,20"]),  # outside the 1024 x 1024 picture
    ("refer", [("box", "0.5,0.5,0.2,0.9"), ("normalized", "true")], ["--box", "0.5,0.5,0.2,0.9", "--normalized"]),
    ("ground", [("phrase", "   ")], ["--phrase", "   "]),
    ("ground", [("phrase", "a <phrase>")], ["--phrase", "a <phrase>"]),
    ("ask", [("question", " ")], ["--question", " "]),
], ids=["malformed-box", "box-outside", "reversed-box", "empty-phrase", "tag-in-phrase", "empty-question"])
def test_bad_arguments_get_400_with_the_clis_message(server, trained_dir, task, fields, cli):
    reply = post(server, task, _image("snowman.png"), fields)
    assert reply.status == 400
    assert reply.body == {"error": cli_error(trained_dir, IMAGES, [task, "snowman.png", *cli])}


@pytest.mark.parametrize("task, fields, status, message", [
    ("ground", [], 400, "ground needs at least one phrase; send it as the field phrase"),
    ("refer", [], 400, "refer needs a box x1,y1,x2,y2; send it as the field box"),
    ("caption", [("phrase", "a dog")], 400, "phrase does not apply to caption (it is a ground field)"),
    ("caption", [("detailled", "true")], 400, "unknown field 'detailled'"),
    ("caption", [("max_new_tokens", "1000")], 400, f"max_new_tokens is 1000; this server makes at most {NEW_TOKENS}"),
    ("caption", [("max_new_tokens", "ten")], 400, "max_new_tokens must be a whole number (got 'ten')"),
    ("caption", [("temperature", "0"), ("sample", "true")], 400, "temperature must be above 0 (got 0)"),
    ("caption", [("num_beams", "3")], 400, "num_beams must be 1"),
    ("segment", [], 404, "unknown task 'segment' (choose from caption, ground, refer, ask)"),
    ("ask", [("question", "why " * 150)], 400, "two_dogs.jpg: the prompt is too long ("),
])
def test_bad_fields_are_named(server, task, fields, status, message):
    reply = post(server, task, _image("two_dogs.jpg"), fields)
    assert reply.status == status
    assert reply.body["error"].startswith(message), reply.body


def test_no_image_too_large_and_tokens(server):
    assert post(server, "caption", None).body == {
        "error": "no image: send it as the multipart field image (or JSON image_base64)"}
    big = post(server, "caption", ("big.png", b"\0" * (UPLOAD_MB * 2 << 20)))
    assert big.status == 413 and re.fullmatch(r"upload too large \([\d,]+ bytes; the limit is 4,194,304 bytes\)",
                                              big.body["error"]), big.body
    blob = base64.b64encode(b"\0" * ((UPLOAD_MB << 20) + 10)).decode()
    too_big = request(f"{server}/v1/caption", json.dumps({"image_base64": blob}).encode(), "application/json")
    assert too_big.status == 413
    none = post(server, "caption", _image("two_dogs.jpg"), token=None)
    assert none.status == 401 and none.body["error"].startswith("this server needs a token")
    wrong = post(server, "caption", _image("two_dogs.jpg"), token="guess")
    assert (wrong.status, wrong.body) == (401, {"error": "wrong token"})
    assert request(f"{server}/v1/info", token=None).status == 401
    assert request(f"{server}/metrics", token="guess").status == 401
    assert metric(server, 'kosmos2_requests_total{status="401"') >= 2


def test_health_info_metrics_and_the_page(server):
    assert request(f"{server}/healthz", token=None).body == {"status": "ok"}
    info = request(f"{server}/v1/info").body
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["rows"] == 16
    assert info["max_new_tokens"] == NEW_TOKENS and info["version"] and info["token"] is True
    before = metric(server, 'kosmos2_requests_total{status="200",task="ask"}')
    _ask(server, next(c for c in CASES if c.task == "ask"))
    assert metric(server, 'kosmos2_requests_total{status="200",task="ask"}') == before + 1
    assert metric(server, 'kosmos2_request_seconds_count{task="ask"}') >= 1
    for name in ("kosmos2_rows_in_flight", "kosmos2_queue_length", "kosmos2_rows"):
        assert name in request(f"{server}/metrics").body
    page = request(f"{server}/", token=None)
    assert page.status == 200 and '<script src="/static/app.js">' in page.body
    script = request(f"{server}/static/app.js", token=None).body
    assert "http://" not in script.replace("http://www.w3.org/2000/svg", "") and "https://" not in script


def test_the_page_colours_are_the_terminals():
    from kosmos2_cli.cli import palette
    from kosmos2_cli.serve.app import STATIC

    script = (STATIC / "app.js").read_text()
    listed = re.search(r"const COLORS = \[(.*?)\];", script, re.S).group(1)
    assert tuple(re.findall(r'"(#[0-9a-f]{6})"', listed)) == palette.COLORS
    assert f'const REGION_COLOR = "{palette.REGION_COLOR}"' in script


def test_a_bad_picture_in_a_burst_leaves_the_others_exact(server, expected, tmp_path):
    bad = truncated_jpeg(tmp_path / "cut.jpg").read_bytes()
    burst = [*CASES[:11], None, *CASES[11:16]]
    with ThreadPoolExecutor(len(burst)) as pool:
        replies = list(pool.map(lambda c: post(server, "caption", ("cut.jpg", bad)) if c is None else
                                post(server, c.task, _image(c.image), c.fields), burst))
    for case, reply in zip(burst, replies, strict=True):
        if case is None:
            assert reply.status == 400 and "cut.jpg: truncated or corrupt image" in reply.body["error"]
        else:
            assert reply.status == 200 and same_record(reply.body, expected[case.key]), case.key


def test_load_32_clients_times_8_requests(server, expected):
    """256 requests from 32 concurrent clients, every task mixed: all answered, every answer exact."""
    clients, each = 32, 8
    pictures = {case.image: (IMAGES / case.image).read_bytes() for case in CASES}
    start = time.perf_counter()

    def client(number: int):
        out = []
        for k in range(each):
            case = CASES[(number * each + k) % len(CASES)]
            out.append((case, post(server, case.task, (case.image, pictures[case.image]), case.fields, timeout=300)))
        return out

    with ThreadPoolExecutor(clients) as pool:
        results = [item for got in pool.map(client, range(clients)) for item in got]
    seconds = time.perf_counter() - start
    assert len(results) == clients * each
    wrong = [case.key for case, reply in results
             if reply.status != 200 or not same_record(reply.body, expected[case.key])]
    assert not wrong, wrong[:5]
    latencies = sorted(reply.seconds for _, reply in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nload: {len(results)} requests from {clients} clients in {seconds:.1f} s "
          f"({len(results) / seconds:.1f} requests/s), latency p50 {p50:.3f} s, p99 {p99:.3f} s")
    assert seconds < 600


def test_sigterm_finishes_what_is_in_flight_and_exits_0(trained_dir, expected):
    """One row at a time, so that requests queue: SIGTERM while they wait and decode; every one is answered
    exactly, new connections are refused, and the process exits 0."""
    detailed = [case for case in CASES if ("detailed", "true") in case.fields]
    burst = (detailed * 8)[:12]
    with serve_subprocess(trained_dir, "--max-new-tokens", str(NEW_TOKENS), "--max-rows", "1", "--quiet") as (
            base, process):
        with ThreadPoolExecutor(len(burst)) as pool:
            futures = [pool.submit(post, base, case.task, _image(case.image), case.fields) for case in burst]
            deadline = time.monotonic() + 60
            while metric(base, "kosmos2_queue_length") < 6 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert metric(base, "kosmos2_queue_length") >= 6, "the requests did not queue up"
            process.send_signal(signal.SIGTERM)
            replies = [future.result(timeout=120) for future in futures]
        assert process.wait(60) == 0
        for case, reply in zip(burst, replies, strict=True):
            assert reply.status == 200 and same_record(reply.body, expected[case.key])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=2).close()


def test_a_client_that_goes_away_frees_its_rows(tmp_path):
    """Random weights rarely stop: a 4000-token caption would decode for a long while. Its client hangs up, and
    its row is freed at once; the next request is answered."""
    model = random_checkpoint()
    with serve_in_process(model, token=None, rows=2, max_new_tokens=4000) as live:
        scheduler = live.service.scheduler
        from serve_helpers import multipart

        body, kind = multipart([("max_new_tokens", "4000")], _image("two_dogs.jpg"))
        port = int(live.base.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while scheduler.rows_in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.rows_in_flight == 1
        sock.close()
        deadline = time.monotonic() + 10
        while scheduler.rows_in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.rows_in_flight == 0
        assert metric(live.base, 'kosmos2_requests_total{status="499"', token=None) == 1
        quick = post(live.base, "caption", _image("two_dogs.jpg"), [("max_new_tokens", "3")], token=None)
        assert quick.status == 200 and quick.body["task"] == "caption"


def _block_encoder(scheduler):
    """Make the model thread wait inside its next encoder call until the returned event is set."""
    kosmos = scheduler.engine.kosmos
    release, entered = threading.Event(), threading.Event()
    original = kosmos.encode_pixels

    def encode(pixels):
        entered.set()
        release.wait(60)
        return original(pixels)

    kosmos.encode_pixels = encode
    return release, entered


def test_queue_full_is_503_and_the_queued_are_answered(trained_dir, expected):
    case = next(c for c in CASES if c.task == "caption")
    with serve_in_process(trained_dir, token=None, rows=2, queue=2, max_new_tokens=NEW_TOKENS) as live:
        release, entered = _block_encoder(live.service.scheduler)
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(post, live.base, case.task, _image(case.image), case.fields, None)
            assert entered.wait(30)  # taken: the model thread holds it
            queued = [pool.submit(post, live.base, case.task, _image(case.image), case.fields, None) for _ in "ab"]
            deadline = time.monotonic() + 30
            while live.service.scheduler.queued < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            full = post(live.base, case.task, _image(case.image), case.fields, token=None)
            release.set()
            answered = [first.result(60), *(f.result(60) for f in queued)]
        assert full.status == 503
        assert full.body == {"error": "the queue is full (2 requests waiting); try again shortly"}
        assert all(reply.status == 200 and same_record(reply.body, expected[case.key]) for reply in answered)


def test_out_of_memory_halves_the_rows_and_answers_exactly(trained_dir, expected):
    """A planted device OOM whenever more than 2 prompts start at once: the rows halve until they fit, and every
    request is answered as alone."""
    burst = [c for c in CASES if c.task == "caption"][:8]
    with serve_in_process(trained_dir, token=None, rows=8, queue=64, max_new_tokens=NEW_TOKENS) as live:
        scheduler = live.service.scheduler
        model = scheduler.engine.kosmos.model
        release, entered = _block_encoder(scheduler)
        original = model.prefill

        def prefill(ids, *args, **kwargs):
            if ids.shape[0] > 2:
                raise RuntimeError("CUDA out of memory (planted by the test)")
            return original(ids, *args, **kwargs)

        model.prefill = prefill
        with ThreadPoolExecutor(len(burst)) as pool:
            futures = [pool.submit(post, live.base, c.task, _image(c.image), c.fields, None) for c in burst]
            assert entered.wait(30)
            deadline = time.monotonic() + 30
            while scheduler.queued + scheduler.rows_in_flight < len(burst) and time.monotonic() < deadline:
                time.sleep(0.01)
            release.set()
            replies = [f.result(120) for f in futures]
        assert scheduler.rows == 2
        for case, reply in zip(burst, replies, strict=True):
            assert reply.status == 200 and same_record(reply.body, expected[case.key]), case.key


def test_a_reachable_server_needs_a_token(trained_dir):
    result = invoke(["serve", "--model", trained_dir, "--host", "0.0.0.0", "--port", "0"], env={"KOSMOS2_TOKEN": ""})
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr and "--token" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_tokens_are_checked_for_loopback_hosts():
    from kosmos2_cli.serve.server import ServeError, check_host, is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.10", "::", "example.org"))
    check_host("0.0.0.0", TOKEN)
    with pytest.raises(ServeError):
        check_host("::", None)


def test_rows_follow_the_demand(trained_dir, expected):
    """A lone request decodes on one row; a crowd widens the rows to its power of two (up to the most)."""
    case = next(c for c in CASES if c.task == "caption")
    with serve_in_process(trained_dir, token=None, rows=8, max_new_tokens=NEW_TOKENS) as live:
        scheduler = live.service.scheduler
        release, entered = _block_encoder(scheduler)
        with ThreadPoolExecutor(7) as pool:
            lone = pool.submit(post, live.base, case.task, _image(case.image), case.fields, None)
            assert entered.wait(30)  # taken alone
            assert scheduler.stream_rows == 1
            crowd = [pool.submit(post, live.base, case.task, _image(case.image), case.fields, None) for _ in range(6)]
            deadline = time.monotonic() + 30
            while scheduler.queued < 6 and time.monotonic() < deadline:
                time.sleep(0.01)
            release.set()
            replies = [lone.result(60), *(f.result(60) for f in crowd)]
        assert scheduler.stream_rows == 8  # 6 prompts: a stream of 8 rows
        assert all(same_record(reply.body, expected[case.key]) for reply in replies)


def test_requests_are_gathered_into_refills_of_a_quarter_of_the_rows():
    """While rows decode, a handful of waiting requests is held (up to gather_wait) until a quarter of the rows'
    worth waits; a lone stream (one row) or an old enough request is taken at once."""
    from types import SimpleNamespace

    from kosmos2_cli.api.options import GenerationOptions
    from kosmos2_cli.serve.scheduler import Scheduler

    scheduler = Scheduler(SimpleNamespace(options=GenerationOptions()), rows=16, queue_limit=64, longest_prompt=160,
                          max_new_tokens=8, gather_wait=0.5)
    now = time.perf_counter()
    scheduler.stream_rows = 16  # a quarter: 4 prompts
    scheduler._queue.extend([SimpleNamespace(prompts=1, submitted=now), SimpleNamespace(prompts=2, submitted=now)])
    assert 0.3 < scheduler._holding() <= 0.5
    scheduler._queue.append(SimpleNamespace(prompts=1, submitted=now))
    assert scheduler._holding() == 0.0  # 4 prompts wait
    scheduler._queue.pop()
    scheduler._queue[0].submitted = now - 0.6
    assert scheduler._holding() == 0.0  # the oldest waited long enough
    scheduler._queue[0].submitted = now
    scheduler.stream_rows = 2
    assert scheduler._holding() == 0.0  # small rows: any request is a refill's share


def test_a_few_late_requests_join_free_rows_without_waiting_for_a_share():
    """The rows ask at every free row; fewer free rows than a refill's share take the waiting requests once they
    all fit and the oldest has waited gather_wait (no answer's worth of waiting for a share to free), while a
    crowd larger than the free rows still waits for a share. A share set by the operator is the rows' own rule."""
    from types import SimpleNamespace

    from kosmos2_cli.api.options import GenerationOptions
    from kosmos2_cli.serve.scheduler import Scheduler

    scheduler = Scheduler(SimpleNamespace(options=GenerationOptions()), rows=16, queue_limit=64, longest_prompt=160,
                          max_new_tokens=8, gather_wait=0.5)
    scheduler.stream_rows = 16  # a share: 4 rows
    now = time.perf_counter()
    scheduler._queue.extend([SimpleNamespace(prompts=1, submitted=now - 0.6),
                             SimpleNamespace(prompts=2, submitted=now)])
    assert scheduler._room(4)  # a share of the rows is free
    assert scheduler._room(3)  # both fit, the oldest waited long enough
    assert not scheduler._room(2)  # they do not all fit: wait for a share
    scheduler._queue[0].submitted = now
    assert not scheduler._room(3)  # too fresh: others may still join them
    scheduler.refill_share = 1.0
    assert scheduler._room(1)  # the rows ask only once the operator's share is free


def test_rows_narrow_when_the_crowd_leaves(trained_dir, expected, monkeypatch):
    """After a crowd, one client that keeps the rows busy still gets narrower rows once the demand stays low."""
    from kosmos2_cli.serve import scheduler as module

    monkeypatch.setattr(module, "SHRINK_AFTER", 0.3)
    case = next(c for c in CASES if c.task == "caption")
    with serve_in_process(trained_dir, token=None, rows=8, max_new_tokens=NEW_TOKENS) as live:
        scheduler = live.service.scheduler
        with ThreadPoolExecutor(8) as pool:
            crowd = [pool.submit(post, live.base, case.task, _image(case.image), case.fields, None) for _ in range(8)]
            assert all(same_record(f.result(60).body, expected[case.key]) for f in crowd)
        widest = scheduler.stream_rows
        deadline = time.monotonic() + 30
        while scheduler.stream_rows > 1 and time.monotonic() < deadline:  # one client, back to back
            reply = post(live.base, case.task, _image(case.image), case.fields, None)
            assert reply.status == 200 and same_record(reply.body, expected[case.key])
        assert widest > 1 and scheduler.stream_rows == 1


def test_uploads_prepared_in_worker_processes_answer_the_same(trained_dir, expected, tmp_path):
    """On a GPU machine uploads are prepared in worker processes: the same records, the same 400s with the CLI's
    messages (a box outside the picture is checked there too), and a killed worker costs no request."""
    import os

    bad = _bad_files(tmp_path)
    with serve_in_process(trained_dir, token=None, rows=16, max_new_tokens=NEW_TOKENS, prepare_workers=2) as live:
        scheduler = live.service.scheduler
        assert scheduler.workers == 2 and scheduler._pool is not None
        submitted = []
        original_submit = scheduler._pool.submit
        scheduler._pool.submit = lambda *a, **k: submitted.append(a) or original_submit(*a, **k)
        case = CASES[0]
        lone = post(live.base, case.task, _image(case.image), case.fields, token=None)
        assert lone.status == 200 and same_record(lone.body, expected[case.key])
        assert not submitted  # a lone request is prepared on its own thread
        scheduler.few_requests = 0  # from here on every upload goes to the processes
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda c: post(live.base, c.task, _image(c.image), c.fields, token=None), CASES))
        for case, reply in zip(CASES, replies, strict=True):
            assert reply.status == 200 and same_record(reply.body, expected[case.key]), case.key
        assert len(submitted) == len(CASES)
        for name, path in bad.items():
            reply = post(live.base, "caption", (name, path.read_bytes()), token=None)
            assert reply.status == 400
            assert reply.body == {"error": cli_error(trained_dir, tmp_path, ["caption", name])}
        outside = post(live.base, "refer", _image("snowman.png"), [("box", "10,10,2000,20")], token=None)
        assert outside.status == 400
        assert outside.body == {"error": cli_error(trained_dir, IMAGES, ["refer", "snowman.png", "--box",
                                                                         "10,10,2000,20"])}
        broken = scheduler._pool
        os.kill(next(iter(broken._processes)), signal.SIGKILL)
        reply = post(live.base, case.task, _image(case.image), case.fields, token=None)
        assert reply.status == 200 and same_record(reply.body, expected[case.key])
        assert scheduler._pool is not broken



def test_uploads_go_to_processes_on_a_gpu_machine_with_cores(monkeypatch):
    import os

    from kosmos2_cli.serve import default_prepare_workers

    monkeypatch.delenv("KOSMOS2_PREPARE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_prepare_workers(on_gpu=True) == 14
    assert default_prepare_workers(on_gpu=False) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert default_prepare_workers(on_gpu=True) == 0
    monkeypatch.setenv("KOSMOS2_PREPARE", "processes")
    assert default_prepare_workers(on_gpu=False) == 2
    monkeypatch.setenv("KOSMOS2_PREPARE", "threads")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert default_prepare_workers(on_gpu=True) == 0


def test_ctrl_c_stops_a_server_with_worker_processes_cleanly(trained_dir, tmp_path):
    """Ctrl-C reaches the whole process group, the preparing processes too: the server drains and exits 130, and
    no worker prints a KeyboardInterrupt traceback."""
    import os
    import subprocess

    port = free_port()
    with open(tmp_path / "serve.log", "w+") as log:
        process = subprocess.Popen([*kosmos2_command(), "serve", "--model", str(trained_dir), "--port", str(port),
                                    "--max-new-tokens", str(NEW_TOKENS)], stdout=log, stderr=log,
                                   env=subprocess_env(KOSMOS2_TOKEN="", KOSMOS2_PREPARE="processes"),
                                   start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, process)
            assert post(base, "caption", _image("snowman.png"), token=None).status == 200
            os.killpg(process.pid, signal.SIGINT)
            assert process.wait(60) == 130  # drained; 130 as for any command the user interrupts
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        log.seek(0)
        text = log.read()
    assert "serving" in text and "Traceback" not in text and "KeyboardInterrupt" not in text, text
