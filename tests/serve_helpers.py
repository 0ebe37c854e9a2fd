"""Helpers for the `kosmos2 serve` tests: real servers on free loopback ports, plain HTTP, and the CLI's records.

Servers are real uvicorn servers: `kosmos2 serve` in a subprocess (as a user starts it), or the same app on a
thread of the test process when a test must reach inside (block the encoder, plant an out-of-memory error).
Requests go over real sockets with urllib, the standard library's client.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import invoke, json_lines, kosmos2_command, subprocess_env

TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart(fields: list[tuple[str, str]], image: tuple[str, bytes] | None) -> tuple[bytes, str]:
    """A multipart/form-data body (as browsers and curl -F send) and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if image is not None:
        filename, data = image
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class Reply:
    status: int
    body: dict | str
    seconds: float = 0.0


def request(url: str, data: bytes | None = None, content_type: str | None = None, token: str | None = TOKEN,
            timeout: float = 120) -> Reply:
    headers = {}
    if content_type:
        headers["Content-Type"] = content_type
    if token:
        headers["Authorization"] = f"Bearer {token}"
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as r:
            status, raw, kind = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as err:
        status, raw, kind = err.code, err.read(), err.headers.get("content-type", "")
    seconds = time.perf_counter() - start
    body = json.loads(raw) if "json" in kind else raw.decode("utf-8", "replace")
    return Reply(status, body, seconds)


def post(base: str, task: str, image: tuple[str, bytes] | None, fields: list[tuple[str, str]] = (),
         token: str | None = TOKEN, timeout: float = 120) -> Reply:
    body, kind = multipart(list(fields), image)
    return request(f"{base}/v1/{task}", body, kind, token, timeout)


def wait_healthy(base: str, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {server_log(process)}")
        try:
            if request(f"{base}/healthz", token=None, timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base} did not become healthy in {timeout} s")


@contextlib.contextmanager
def serve_subprocess(model: Path, *args: str, token: str | None = TOKEN):
    """`kosmos2 serve` as a user runs it, on a free loopback port: (base url, process)."""
    port = free_port()
    command = [*kosmos2_command(), "serve", "--model", str(model), "--port", str(port), *args]
    if token:
        command += ["--token", token]
    log = tempfile.TemporaryFile("w+")  # a pipe could fill up and stall the server
    process = subprocess.Popen(command, stdout=log, stderr=log, text=True, env=subprocess_env(KOSMOS2_TOKEN=""))
    process.log = log  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process)
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        log.close()


def server_log(process) -> str:
    process.log.seek(0)
    return process.log.read()


@dataclass
class InProcess:
    base: str
    service: object
    server: object
    thread: threading.Thread = field(repr=False)


@contextlib.contextmanager
def serve_in_process(model: Path, token: str | None = TOKEN, **limits):
    """The same app under uvicorn on a thread of this process, so that a test can reach its scheduler."""
    import uvicorn

    from kosmos2_cli.api.options import GenerationOptions
    from kosmos2_cli.runtime.engine import PipelineEngine
    from kosmos2_cli.serve import Limits, Service
    from kosmos2_cli.serve.server import listen

    engine = PipelineEngine(model, "cpu", "float32", GenerationOptions(max_new_tokens=limits.get("max_new_tokens",
                                                                                                   128)))
    engine.load()
    service = Service.build(engine, str(model), Limits(**limits), token)
    sock = listen("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(service.app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_healthy(base)
        yield InProcess(base, service, server, thread)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def metric(base: str, name: str, token: str | None = TOKEN) -> float:
    """One sample of /metrics (the sum over its labels when it has several)."""
    text = request(f"{base}/metrics", token=token).body
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key == name or key.startswith(name + "{") or ("{" in name and key.startswith(name)):
                total += float(value)
    return total


# -- the CLI's records --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One request: the task, the picture (a fixture file name), its form fields and the same as CLI flags."""

    task: str
    image: str
    fields: tuple[tuple[str, str], ...]
    cli: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.task}|{self.image}|{self.fields}"


def cases(lessons) -> list[Case]:
    """A request for every task of every lesson picture: captions (and detailed ones), one ground per picture
    with all its phrases, refer by pixel box, every question."""
    from PIL import Image

    out, grounds = [], {}
    for lesson in lessons:
        if lesson.task in ("caption", "detailed"):
            detailed = lesson.task == "detailed"
            out.append(Case("caption", lesson.image, (("detailed", "true"),) if detailed else (),
                            ("--detailed",) if detailed else ()))
        elif lesson.task == "ground":
            grounds.setdefault(lesson.image, []).append(lesson.phrase)
        elif lesson.task == "refer":
            with Image.open(lesson.path) as image:
                width, height = image.size
            x1, y1, x2, y2 = lesson.box
            box = ",".join(str(v) for v in (x1 * width, y1 * height, x2 * width, y2 * height))
            out.append(Case("refer", lesson.image, (("box", box),), ("--box", box)))
        elif lesson.task == "ask":
            out.append(Case("ask", lesson.image, (("question", lesson.question),), ("--question", lesson.question)))
    for image, phrases in grounds.items():
        out.append(Case("ground", image, tuple(("phrase", p) for p in phrases),
                        tuple(a for p in phrases for a in ("--phrase", p))))
    return out


def cli_records(model: Path, images: Path, all_cases: list[Case], max_new_tokens: int) -> dict[str, dict]:
    """What `kosmos2 TASK IMAGE --json` prints for each case, run in the pictures' folder so that `image` is the
    bare file name (as an upload's)."""
    records = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(images)
        for case in all_cases:
            result = invoke([case.task, case.image, *case.cli, "--model", model, "--json", "--max-new-tokens",
                             str(max_new_tokens)])
            assert result.exit_code == 0, result.stderr
            [records[case.key]] = json_lines(result.stdout)
    return records


def cli_error(model: Path, folder: Path, args: list[str]) -> str:
    """The CLI's message for a bad input: its error record's `error` (a bad image) or its `error:` line."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = invoke([*args, "--model", model, "--json"])
    assert result.exit_code != 0
    lines = json_lines(result.stdout) if result.stdout.strip() else []
    if lines:
        return lines[0]["error"]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line.removeprefix("error: ")


SCORE_ATOL = 1e-5  # box scores (6 significant digits) of fp32 rows batched with other requests, as the CLI's tests


def same_record(got: dict, want: dict) -> bool:
    """Key for key and value for value, box scores within SCORE_ATOL (a row's fp32 sums may round one way in a
    batch of 8 and another in a batch of 3: the last of 6 digits can move by one)."""
    def scoreless(record):
        return {**record, "entities": [{**e, "scores": None} for e in record.get("entities", [])]}

    if scoreless(got) != scoreless(want):
        return False
    return all(len(a["scores"]) == len(b["scores"]) and all(abs(x - y) <= SCORE_ATOL for x, y in
                                                             zip(a["scores"], b["scores"], strict=True))
               for a, b in zip(got["entities"], want["entities"], strict=True))
