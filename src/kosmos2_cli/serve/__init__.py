"""`kosmos2 serve`: one model shared by many clients over HTTP, their requests batched together (DESIGN §8).

`Service.build` makes the scheduler and the app over a loaded engine; `serve.server.run` runs it with uvicorn.
FastAPI, uvicorn and prometheus-client come with the `serve` extra.
"""

from __future__ import annotations

from dataclasses import dataclass

from kosmos2_cli.runtime.engine import PipelineEngine

PROMPT_TOKENS = 160  # most tokens of a prompt, the image's 64 included (a question of ~80 words)


@dataclass
class Limits:
    """What bounds the service: rows decoding at once, requests waiting, upload size, tokens per answer."""

    rows: int = 0  # 0: as kosmos2 batch sizes its batches (the device's free memory; 8 on a CPU)
    queue: int = 256
    upload_bytes: int = 20 << 20
    max_new_tokens: int = 128
    prompt_tokens: int = PROMPT_TOKENS
    prepare_workers: int | None = None  # processes preparing uploads; None: `default_prepare_workers`


def default_prepare_workers(on_gpu: bool) -> int:
    """Processes that decode and preprocess uploads (0: the request handlers' threads do).

    A crowd's uploads are ~10 ms of CPU each; on threads they contend for the GIL with the model thread, which
    needs it every few ms to launch the next step, and a GPU then idles between steps. Processes take that work
    off the GIL, on GPU machines with cores to spare. On a CPU the model's own threads use the cores: none.
    KOSMOS2_PREPARE=processes|threads overrides, as for `kosmos2 batch`.
    """
    from kosmos2_cli.runtime.runner import cores_to_spare, forced_processes, process_workers

    forced = forced_processes()
    use = (on_gpu and cores_to_spare()) if forced is None else forced
    return process_workers() if use else 0


@dataclass
class Service:
    """A scheduler over one engine, and its ASGI app."""

    scheduler: object
    app: object

    @classmethod
    def build(cls, engine: PipelineEngine, model: str, limits: Limits, token: str | None = None,
              refill_share: float | None = None, notice=None) -> Service:
        from kosmos2_cli.runtime.runner import default_batch_size
        from kosmos2_cli.serve.app import ServeConfig, create_app
        from kosmos2_cli.serve.scheduler import Scheduler

        rows = limits.rows or default_batch_size(engine)
        workers = default_prepare_workers(engine.on_gpu) if limits.prepare_workers is None else limits.prepare_workers
        scheduler = Scheduler(engine, rows, limits.queue, limits.prompt_tokens, limits.max_new_tokens,
                              refill_share=refill_share, notice=notice, workers=workers)
        app = create_app(scheduler, ServeConfig(model, token, limits.upload_bytes, limits.max_new_tokens))
        return cls(scheduler, app)
