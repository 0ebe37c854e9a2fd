"""`kosmos2 serve` against a one-request-at-a-time server on the reference, at 1, 8, 64 and 256 concurrent clients.

    python benchmarks/serve.py --json serve.json                       # GPU: full-size random weights, 64 tokens
    python benchmarks/serve.py --smoke                                 # a quick check anywhere (tiny model, CPU)
    python benchmarks/serve.py --only ours --json ours.json            # one side per call (each fits 10 minutes)
    python benchmarks/serve.py --table ours.json reference.json        # then the table of both
    python benchmarks/serve.py --http ...                              # ours through uvicorn + HTTP (needs the
                                                                       # serve extra), the reference's through
                                                                       # the standard library's HTTP server

Both sides get the same full-size random weights (built once, as by gpu.py) and every request is the same caption
of one 640x480 PNG (sent as bytes: each request decodes and preprocesses it), answered with exactly 64 new tokens:
ours with EOS never matched, the reference with `min_new_tokens=max_new_tokens=64`.

- ours: the service's scheduler (`kosmos2_cli.serve.scheduler`): each client thread prepares its upload (in the
  service's worker processes on a GPU machine, as `kosmos2 serve` does), submits it
  and waits for its record, as the HTTP handler does; concurrent requests share the rows (continuous batching).
  Without `--http` no web stack is needed (the GPU machine has none); with it, real uvicorn and HTTP.
- reference: transformers' Kosmos2ForConditionalGeneration on one worker thread, one request at a time, first come
  first served (processor, generate, decode, post-process): what a team's FastAPI wrapper around the seed's example
  does.

Each level runs untimed warm-up requests first, then `max(16, 8 x clients)` timed requests for ours
(`--per-client`) and `max(16, clients)` for the reference (its rate does not depend on the clients; its latency
grows with them). Prints a table of requests/s (ours: also the steady rate, while every client is busy) and
p50/p99 latency with the ratios; `--json OUT` writes it. Runs before 2026-12-08 timed 2 requests per client, so
their rates at 256 clients counted two rounds: the first uploads arriving at once and the last answers draining.
"""

from __future__ import annotations

import argparse
import io
import os
import queue
import statistics
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from common import dump, full_size_checkpoint, synthetic_image

NEW_TOKENS = 64
PROMPT = "<grounding> An image of"


def picture_bytes() -> bytes:
    buffer = io.BytesIO()
    synthetic_image().save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_checkpoint() -> Path:
    """A random tiny Kosmos-2 (real vocabulary and image geometry) for --smoke."""
    import oracle

    folder = Path(tempfile.gettempdir()) / "kosmos2-serve-bench-tiny"
    if not (folder / "DONE").exists():
        oracle.save_reference_checkpoint(folder, oracle.tiny_config(latent_query_num=64))
        (folder / "DONE").write_text("ok")
    return folder


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def drive(call, clients: int, requests: int) -> dict:
    """`requests` calls of `call()` from `clients` threads: requests/s and latency percentiles.

    Two rates: over the whole run, and steady, between the `clients`-th and the `clients`-th last answer. Before
    the first, the clients' first uploads all came at once; after the second, fewer clients are left than
    started. Between them every client is waiting for an answer or sending its next request."""
    latencies: list[float] = []
    ends: list[float] = []
    lock = threading.Lock()
    left = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            start = time.perf_counter()
            call()
            with lock:
                ends.append(time.perf_counter())
                latencies.append(ends[-1] - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    seconds = time.perf_counter() - start
    ends.sort()
    inside = requests - 2 * clients
    steady = inside / (ends[requests - clients - 1] - ends[clients - 1]) if inside > 0 else None
    return {"clients": clients, "requests": requests, "seconds": round(seconds, 3),
            "requests_per_s": round(requests / seconds, 2),
            "steady_requests_per_s": None if steady is None else round(steady, 2),
            "p50_s": round(statistics.median(latencies), 4), "p99_s": round(percentile(latencies, 0.99), 4)}


# -- ours ---------------------------------------------------------------------------------------------------------

class Ours:
    """The service's scheduler over the bundled engine; `call` is one client's request (or one HTTP request)."""

    def __init__(self, folder: Path, device: str, rows: int, http: bool) -> None:
        from kosmos2_cli.api.options import GenerationOptions
        from kosmos2_cli.api.tasks import TaskSpec
        from kosmos2_cli.runtime.engine import PipelineEngine
        from kosmos2_cli.serve import default_prepare_workers
        from kosmos2_cli.serve.scheduler import Scheduler

        self.engine = PipelineEngine(folder, device, "auto", GenerationOptions(max_new_tokens=NEW_TOKENS))
        self.engine.load()
        self.engine.kosmos.model.config.text_config.eos_token_id = -1  # never matched: 64 tokens every time
        self.spec = TaskSpec.build("caption")
        self.options = GenerationOptions(max_new_tokens=NEW_TOKENS)
        self.data = picture_bytes()
        self.http = http
        if http:
            self._start_http(folder, rows)
        else:
            self.scheduler = Scheduler(self.engine, rows, queue_limit=4096, longest_prompt=160,
                                       max_new_tokens=NEW_TOKENS,
                                       workers=default_prepare_workers(self.engine.on_gpu))
            self.scheduler.start()

    def _start_http(self, folder: Path, rows: int) -> None:
        import uvicorn

        from kosmos2_cli.serve import Limits, Service
        from kosmos2_cli.serve.server import listen

        service = Service.build(self.engine, str(folder), Limits(rows=rows, queue=4096, max_new_tokens=NEW_TOKENS))
        self.scheduler = service.scheduler
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/caption"
        self.server = uvicorn.Server(uvicorn.Config(service.app, log_level="warning", lifespan="on",
                                                    limit_concurrency=10_000, backlog=4096))
        threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)
        boundary = "kosmos2bench"
        self.body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="bench.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n").encode() + self.data + f"\r\n--{boundary}--\r\n".encode()
        self.kind = f"multipart/form-data; boundary={boundary}"

    def call(self) -> None:
        if self.http:
            import urllib.request

            request = urllib.request.Request(self.url, data=self.body, headers={"Content-Type": self.kind})
            with urllib.request.urlopen(request, timeout=600) as reply:
                assert reply.status == 200
                reply.read()
            return
        from kosmos2_cli.serve.scheduler import prepare_work

        work = prepare_work(self.scheduler, self.spec, self.data, "bench.png", self.options)
        started = self.scheduler.submit(work).result()
        record = self.scheduler.finish(work, started)
        assert record["task"] == "caption"

    def close(self) -> None:
        if self.http:
            self.server.should_exit = True
            time.sleep(0.5)
        else:
            self.scheduler.stop()


# -- the reference ------------------------------------------------------------------------------------------------

class Reference:
    """transformers' Kosmos-2, one request at a time on one worker thread (in process, or a ThreadingHTTPServer)."""

    def __init__(self, folder: Path, device: str, http: bool) -> None:
        from oracle import reference_processor
        from transformers import Kosmos2ForConditionalGeneration

        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = Kosmos2ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).to(self.device).eval()
        self.processor = reference_processor(folder)  # the released tokenizer and image settings
        self.dtype = dtype
        self.data = picture_bytes()
        self.requests: queue.Queue = queue.Queue()  # first come, first served, by one worker thread
        threading.Thread(target=self._work, daemon=True).start()
        self.http = http
        if http:
            self._start_http()

    def answer(self, data: bytes) -> dict:
        done: Future = Future()
        self.requests.put((data, done))
        return done.result()

    def _work(self) -> None:
        while True:
            data, done = self.requests.get()
            try:
                done.set_result(self._answer(data))
            except Exception as err:  # noqa: BLE001 - the waiting client raises it
                done.set_exception(err)

    def _answer(self, data: bytes) -> dict:
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = self.processor(text=PROMPT, images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            ids = self.model.generate(pixel_values=inputs["pixel_values"].to(self.dtype),
                                      input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      image_embeds_position_mask=inputs["image_embeds_position_mask"],
                                      use_cache=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        text = self.processor.batch_decode(ids, skip_special_tokens=True)[0]
        caption, entities = self.processor.post_process_generation(text)
        return {"text": caption, "entities": entities}

    def _start_http(self) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        reference = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the standard library's name
                data = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.dumps(reference.answer(data)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.request_queue_size = 4096
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def call(self) -> None:
        if self.http:
            import urllib.request

            request = urllib.request.Request(self.url, data=self.data, headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(request, timeout=3600) as reply:
                reply.read()
            return
        self.answer(self.data)

    def close(self) -> None:
        if self.http:
            self.server.shutdown()


def measure(side, levels: list[int], ours: bool, warmup: int, result: dict, out: Path | None,
            per_client: int = 8) -> None:
    """Each level into `result` (written to `out` after each, so a run cut short keeps what it measured)."""
    rows = result.setdefault("ours" if ours else "reference", [])
    for clients in levels:
        drive(side.call, clients, max(warmup, clients) if ours else warmup)  # graphs captured, caches warm
        rows.append(drive(side.call, clients, max(16, per_client * clients) if ours else max(16, clients)))
        print(f"  {'ours' if ours else 'reference'} {clients:>4} clients: {rows[-1]}", flush=True)
        dump(out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kosmos2-full",
                        help="full-size random weights (built there once, as by gpu.py)")
    parser.add_argument("--model", type=Path, default=None, help="another model folder instead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=256, help="our server's rows")
    parser.add_argument("--levels", default="1,8,64,256", help="concurrent clients, comma-separated")
    parser.add_argument("--per-client", type=int, default=8,
                        help="our timed requests per client at each level (at least 16 in all)")
    parser.add_argument("--only", choices=["ours", "reference"], default=None)
    parser.add_argument("--http", action="store_true", help="over loopback HTTP (ours needs the serve extra)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model on the CPU, 1 and 8 clients")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSON",
                        help="print the table of earlier --json files (e.g. an --only ours and an --only reference)")
    args = parser.parse_args()
    if args.table:
        import json

        merged: dict = {}
        for path in args.table:
            merged.update(json.loads(path.read_text()))
        table(merged)
        dump(args.json, merged)
        return

    global NEW_TOKENS
    if args.smoke:
        NEW_TOKENS = 8
        args.device, args.rows, args.levels = "cpu", 8, "1,8"
        folder = args.model or tiny_checkpoint()
    else:
        folder = args.model or full_size_checkpoint(args.weights)
    levels = [int(v) for v in args.levels.split(",")]
    warmup = 2 if args.smoke else 4
    result: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "new_tokens": NEW_TOKENS, "rows": args.rows, "http": args.http, "levels": levels,
                    "per_client": args.per_client}
    if args.only != "reference":
        ours = Ours(folder, args.device, args.rows, args.http)
        measure(ours, levels, True, warmup, result, args.json, args.per_client)
        ours.close()
        del ours
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.only != "ours":
        reference = Reference(folder, args.device, args.http)
        measure(reference, levels, False, warmup, result, args.json)
        reference.close()
    table(result)
    dump(args.json, result)


def table(result: dict) -> None:
    """Ours: requests/s over the whole run and steady (see `drive`); the ratios use the whole run's."""
    ours, ref = result.get("ours"), result.get("reference")
    print(f"\n{result['device']}, {result['new_tokens']}-token captions, {result['rows']} rows, "
          f"{'HTTP' if result['http'] else 'in process'}")
    print(f"{'clients':>7} | {'ours req/s':>10} {'steady':>7} {'p50 s':>7} {'p99 s':>7} | {'ref req/s':>9} "
          f"{'p50 s':>7} {'p99 s':>7} | {'req/s x':>7} {'p50 x':>6}")
    for i, clients in enumerate(result["levels"]):
        a = ours[i] if ours and i < len(ours) else None  # a run cut short has fewer levels
        b = ref[i] if ref and i < len(ref) else None
        cells = [f"{clients:>7}"]
        steady = a.get("steady_requests_per_s") if a else None  # absent from files of earlier runs
        steady_cell = f"{steady:>7.2f}" if steady is not None else f"{'-':>7}"
        cells.append(f"{a['requests_per_s']:>10.2f} {steady_cell} {a['p50_s']:>7.3f} {a['p99_s']:>7.3f}" if a
                     else f"{'':>34}")
        cells.append(f"{b['requests_per_s']:>9.2f} {b['p50_s']:>7.3f} {b['p99_s']:>7.3f}" if b else f"{'':>25}")
        cells.append(f"{a['requests_per_s'] / b['requests_per_s']:>7.1f} {b['p50_s'] / a['p50_s']:>6.1f}"
                     if a and b else "")
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
