"""The HTTP face of `kosmos2 serve` (DESIGN §8): the task endpoints, health, info, metrics and the web page.

Every answer of `POST /v1/TASK` is the record `kosmos2 TASK IMAGE --json` prints for the upload (its `image` the
upload's file name); every refusal is JSON `{"error": "..."}` with the CLI's words: 400 bad input, 401 missing or
wrong token, 404 unknown task, 413 upload too large, 503 queue full or shutting down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from kosmos2_cli import __version__
from kosmos2_cli.api.prompts import TASKS, PromptError
from kosmos2_cli.processing.images import ImageLoadError
from kosmos2_cli.serve.fields import Fields, HTTPProblem, bad, generation_options, task_spec, worded
from kosmos2_cli.serve.metrics import Metrics
from kosmos2_cli.serve.scheduler import Draining, QueueFull, Scheduler, TooBig, Work, prepare_work

log = logging.getLogger("kosmos2.serve")
STATIC = resources.files("kosmos2_cli.serve") / "static"
FORM_SLACK = 64 << 10  # bytes a request may carry beside its image (fields, multipart boundaries)
DRAIN_FACTOR = 4  # a refused body up to this many times the limit is read (and dropped) before answering


@dataclass
class ServeConfig:
    """The service's limits and what /v1/info tells."""

    model: str
    token: str | None = None
    max_upload_bytes: int = 20 << 20
    max_new_tokens: int = 128  # a request's default and its most


def create_app(scheduler: Scheduler, config: ServeConfig) -> FastAPI:
    """The ASGI app over a started-or-not scheduler (the app's lifespan starts it and drains it)."""
    metrics = Metrics(scheduler)
    engine = scheduler.engine
    defaults = engine.options

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if scheduler._thread is None:
            await run_in_threadpool(scheduler.start)
        yield
        await run_in_threadpool(scheduler.stop)  # drain: what was accepted is answered

    app = FastAPI(title="kosmos2 serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    def authorized(request: Request) -> None:
        if config.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise HTTPProblem(401, "this server needs a token: send the header Authorization: Bearer TOKEN")
        if not hmac.compare_digest(value.strip().encode(), config.token.encode()):
            raise HTTPProblem(401, "wrong token")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if scheduler.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "stopping" if scheduler._stopping else "not ready"}, status_code=503)

    def refused(request: Request) -> JSONResponse | None:
        try:
            authorized(request)
        except HTTPProblem as err:
            return _error(err.status, str(err))
        return None

    @app.get("/v1/info")
    async def info(request: Request) -> JSONResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        model = engine.kosmos.model
        return JSONResponse({
            "model": config.model, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
            "version": __version__, "tasks": list(TASKS), "rows": scheduler.rows, "queue_limit": scheduler.queue_limit,
            "max_upload_bytes": config.max_upload_bytes, "max_new_tokens": config.max_new_tokens,
            "token": config.token is not None,
        })

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if (refusal := refused(request)) is not None:
            return refusal
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/v1/{task}")
    async def run(task: str, request: Request) -> Response:
        start = time.perf_counter()
        label = task if task in TASKS else "unknown"
        status = 500
        try:
            try:
                authorized(request)
                body = await _body(request, config.max_upload_bytes)
            except HTTPProblem:
                await _drain(request, config.max_upload_bytes)
                raise
            fields, upload, name = await _fields(request, body, config.max_upload_bytes)
            spec = task_spec(task, fields)
            options = generation_options(fields, _request_defaults(defaults, config), config.max_new_tokens)
            if upload is None:
                raise bad("no image: send it as the multipart field image (or JSON image_base64)")
            if len(upload) > config.max_upload_bytes:
                raise _too_large(len(upload), config.max_upload_bytes)
            work = await run_in_threadpool(_prepare, scheduler, spec, upload, name, options)
            try:
                future = scheduler.submit(work)
            except (QueueFull, Draining) as err:
                raise HTTPProblem(503, str(err)) from err
            started = await _answered(future, request)
            if started is None:  # the client went away: its rows are freed
                scheduler.cancel(work)
                status = 499
                return Response(status_code=499)
            record = await run_in_threadpool(scheduler.finish, work, started)
            status = 200
            return JSONResponse(record)
        except HTTPProblem as err:
            status = err.status
            return _error(err.status, str(err))
        except TooBig as err:
            status = 507
            return _error(507, str(err))
        except Exception as err:  # a bug, or the device failing: one request's 500, never a crash
            log.exception("request failed")
            return _error(500, f"internal error ({type(err).__name__}: {err})")
        finally:
            metrics.observe(label, status, time.perf_counter() - start)

    return app


def _request_defaults(defaults, config: ServeConfig):
    from dataclasses import replace

    return replace(defaults, max_new_tokens=min(defaults.max_new_tokens, config.max_new_tokens), num_beams=1)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


def _too_large(size: int, limit: int) -> HTTPProblem:
    return HTTPProblem(413, f"upload too large ({size:,} bytes; the limit is {limit:,} bytes)")


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past the image limit (base64 and form fields allowed for)."""
    cap = limit * 4 // 3 + FORM_SLACK
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _too_large(size, limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - Starlette's own cache: `request.form()` parses these bytes
    return body


async def _drain(request: Request, limit: int) -> None:
    """Read (and drop) a refused body up to a bound, so that the client reads our answer rather than a reset."""
    if hasattr(request, "_body"):
        return
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_FACTOR * limit:
                return
    except Exception:  # noqa: BLE001 - the client went away or the stream was read: nothing to drain
        return


async def _fields(request: Request, body: bytes, limit: int) -> tuple[Fields, bytes | None, str]:
    """(fields, image bytes or None, the image's name) from a multipart/urlencoded form or a JSON object."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            data = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError) as err:
            raise bad(f"the body is not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise bad("the JSON body must be an object")
        encoded = data.pop("image_base64", None)
        name = data.pop("filename", None) or "image"
        if not isinstance(name, str):
            raise bad("filename must be text")
        if "image" in data:
            raise bad("in JSON the image goes in image_base64 (the field image is the multipart file)")
        upload = None
        if encoded is not None:
            if not isinstance(encoded, str):
                raise bad("image_base64 must be a base64 string")
            try:
                upload = base64.b64decode(encoded.split(",", 1)[-1] if encoded.startswith("data:") else encoded,
                                          validate=True)
            except (binascii.Error, ValueError) as err:
                raise bad(f"image_base64 is not valid base64 ({err})") from err
            if len(upload) > limit:
                raise _too_large(len(upload), limit)
        return Fields({key: [value] for key, value in data.items()}), upload, name
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _form(request)
    raise bad(f"send the image as multipart/form-data or JSON (got content type {kind or 'none'!r})")


async def _form(request: Request) -> tuple[Fields, bytes | None, str]:
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=2, max_fields=256)
    except Exception as err:  # noqa: BLE001 - Starlette's parser says what is malformed
        raise bad(f"the form cannot be read ({err})") from err
    values: dict[str, list[Any]] = {}
    upload, name = None, "image"
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "image" or upload is not None:
                raise bad(f"only one file, the field image, may be sent (got a file as {key!r})")
            upload, name = await value.read(), value.filename or "image"
        elif key == "image":
            raise bad("the field image must be a file (multipart/form-data with a filename)")
        else:
            values.setdefault(key, []).append(value)
    return Fields(values), upload, name


def _prepare(scheduler: Scheduler, spec, upload: bytes, name: str, options) -> Work:
    """`prepare_work` on a worker thread, its refusals as 400s with the CLI's messages."""
    try:
        return prepare_work(scheduler, spec, upload, name, options)
    except (ImageLoadError, PromptError) as err:
        message = worded(err)
        raise bad(message if message.startswith(f"{name}:") else f"{name}: {message}") from err


async def _answered(future, request: Request):
    """The request's Started once its answers end; None if the client disconnects first."""
    waiter = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiter}, timeout=0.2)
        if done:
            return waiter.result()
        if await request.is_disconnected():
            return None
