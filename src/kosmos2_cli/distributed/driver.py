"""The driver of a `--ray` run: joins (or starts) the cluster, builds the Ray Data pipeline, streams records back.

    names (Arrow blocks) -> map_batches(prepare_batch): CPU tasks, decode + preprocess
                         -> map_batches(ModelWorker): an actor pool, one actor per GPU (or N CPU actors)
                         -> iter_batches on the driver: each record handed to the caller, which writes it

Ray restarts an actor that dies (`max_restarts`) and retries its calls (`max_task_retries`), and retries CPU
tasks, so a lost worker's images are done again; a record may then come back twice, so `records` drops any
whose key the caller has already written (`done`, the output file's live set of keys).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Container, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kosmos2_cli.api.tasks import record_key
from kosmos2_cli.distributed.stages import Job, ModelWorker, prepare_batch

if TYPE_CHECKING:
    import pyarrow as pa

BLOCK = 128  # images per block of names: a CPU task prepares one block
PREPARE_BATCH = 16  # images per call within a CPU task
# Images per actor call, in multiples of its rows: rows refill continuously within a call, but a call's last
# answers run with its rows part-full, and the next call starts once it returns. Longer calls on GPUs (1.2 GB of
# pixels at 2048 images); KOSMOS2_RAY_BATCH overrides.
GPU_CALL_ROWS = 8
CPU_CALL_ROWS = 4
GPU_ROWS = 256  # rows an actor is assumed to hold when sizing its calls (the runtime's largest automatic size)
CPU_ROWS = 8
PREPARE_MEMORY = 512 << 20  # bytes a CPU task reserves
IN_FLIGHT_PER_ACTOR = 2  # calls queued at each actor: the next one's pixels are there when one ends


class RayUnavailable(ImportError):
    """Ray (with Ray Data) is not installed here."""

    advice = "ray"


class ClusterError(RuntimeError):
    """The cluster cannot run this job: not reachable, not enough GPUs, a worker that cannot start."""

    def __init__(self, message: str, advice: str | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice
        self.kind = kind  # a worker's error: its exception's class name (e.g. ModelLoadError)


def require_ray() -> None:
    """Raise RayUnavailable unless `ray.data` imports."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as err:
        raise RayUnavailable("Ray is not installed") from err


@contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """Ray's C++ core announces its log level on the process's stderr as it starts: not for our users. Python's
    own writes wait in their buffers meanwhile; exceptions still come through."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet() -> None:
    """Ray's and Ray Data's own console output off (their log files stay complete): the caller shows its own
    progress, one-line errors and, with --json, a summary object on stdout that nothing else may write to."""
    import ray._private.worker as ray_worker
    import ray.data

    logging.getLogger("ray").setLevel(logging.ERROR)
    data_logger = logging.getLogger("ray.data")
    for handler in list(data_logger.handlers):
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            data_logger.removeHandler(handler)  # Ray Data's console handler; its ray-data.log keeps everything
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")  # tuning advice for Ray Data's users, not ours
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    for attribute in ("print_on_execution_start", "enable_operator_progress_bars", "verbose_progress"):
        if hasattr(context, attribute):
            setattr(context, attribute, False)
    # The cluster's notices to this driver ("task failed, will be retried", printed on stdout): to the log.
    if hasattr(ray_worker, "print_to_stdstream"):
        notices = logging.getLogger("kosmos2_cli.distributed.ray")
        ray_worker.print_to_stdstream = lambda data, ignore_prefix=False: notices.debug(
            "%s", "\n".join(data.get("lines", ())))


class Cluster:
    """A connection to a Ray cluster for one run (a context manager: disconnects, or stops the local cluster it
    started). `address`: None joins RAY_ADDRESS or a cluster running on this machine, else starts a local one;
    "auto" must join a running cluster; "local" always starts a local one; anything else is an address."""

    def __init__(self, address: str | None = None) -> None:
        require_ray()
        import ray

        # Ray's C++ core logs warnings about its own internals on this process's stderr: only fatal ones here.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        # The workers run this driver's own kosmos2_cli (shipped with the job): every node needs only the
        # dependencies, and a driver and its workers never disagree on versions.
        package = Path(__file__).resolve().parents[1]
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR,
                                  "configure_logging": True,
                                  "runtime_env": {"py_modules": [str(package)], "excludes": ["__pycache__"]}}
        local = {"include_dashboard": False}
        try:
            with _native_stderr_muted():
                self._init(ray, address, kwargs, local)
        except ConnectionError as err:
            raise ClusterError(f"no Ray cluster at {address or os.environ.get('RAY_ADDRESS')} "
                               f"({' '.join(str(err).split())})", advice="ray_address") from err
        except (ValueError, RuntimeError) as err:
            raise ClusterError(f"cannot join the Ray cluster ({' '.join(str(err).split())})",
                               advice="ray_address") from err
        _quiet()
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        self.cpus = int(resources.get("CPU", 0))

    @staticmethod
    def _init(ray, address: str | None, kwargs: dict[str, Any], local: dict[str, Any]) -> None:
        if address is None and not os.environ.get("RAY_ADDRESS"):
            try:
                ray.init(address="auto", **kwargs)
            except ConnectionError:
                ray.init(address="local", **kwargs, **local)
        elif address == "local":
            ray.init(address="local", **kwargs, **local)
        else:
            ray.init(address=address, **kwargs)

    def plan(self, device: str, actors: int) -> tuple[str, int]:
        """(actor device "cuda" or "cpu", number of model actors) for the user's device and actor count
        (0: one per GPU, or one CPU actor where the cluster has no GPU)."""
        name = device.strip().lower()
        wants_gpu = name.startswith("cuda") or (name == "auto" and self.gpus > 0)
        if wants_gpu and not self.gpus:
            raise ClusterError(f"device {device!r} asked for, but the Ray cluster has no GPU", advice="device")
        if not wants_gpu and name not in ("auto", "cpu"):
            raise ClusterError(f"device {device!r} cannot run on Ray workers (use auto, cpu or cuda)",
                               advice="device")
        if wants_gpu:
            count = actors or self.gpus
            if count > self.gpus:
                raise ClusterError(f"{count} model actors need {count} GPUs; the Ray cluster has {self.gpus}",
                                   advice="ray_actors")
            return "cuda", count
        count = actors or 1
        if count >= max(self.cpus, 1):
            raise ClusterError(f"{count} CPU model actors leave none of the cluster's {self.cpus} CPUs to prepare "
                               "images", advice="ray_actors")
        return "cpu", count

    def records(self, job: Job, names: pa.ChunkedArray, actors: int, done: Container[str]) -> Iterator[dict]:
        """The records of the images `names`, as they come back (any order), each once: one whose key is in
        `done` (written already: a worker's images done again after it died) is dropped."""
        import pyarrow as pa
        import ray
        import ray.data

        gpu = job.device == "cuda"
        rows = job.batch_size or (GPU_ROWS if gpu else CPU_ROWS)
        per_call = int(os.environ.get("KOSMOS2_RAY_BATCH") or 0) or (GPU_CALL_ROWS if gpu else CPU_CALL_ROWS) * rows
        # Blocks no larger than an actor call: Ray Data hands whole blocks to actors, so this spreads the work.
        table = pa.table({"image": names})
        size = max(1, min(BLOCK, per_call))
        dataset = ray.data.from_arrow([table.slice(start, size) for start in range(0, len(table), size)])
        # Ray Data's defaults are what a lost worker needs: its tasks are retried (max_retries=-1), its actors
        # restarted (max_restarts=-1) and their calls retried (max_task_retries=-1); tests/test_ray.py kills one.
        # `memory`: room to decode a large photo; also keeps Ray Data from fusing this stage into the actors (it
        # fuses stages whose resources match), so preparation stays on CPU tasks beside the model.
        dataset = dataset.map_batches(prepare_batch, fn_kwargs={"job": job}, batch_size=min(PREPARE_BATCH, size),
                                      batch_format="pyarrow", num_cpus=1, memory=PREPARE_MEMORY)
        resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        dataset = dataset.map_batches(
            ModelWorker, fn_constructor_kwargs={"job": job}, batch_size=per_call, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=IN_FLIGHT_PER_ACTOR),
            **resources)
        self.duplicates = 0
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
                for line in batch.column("record").to_pylist():
                    record = json.loads(line)
                    key = record_key(record)
                    if key is not None and key in done:
                        self.duplicates += 1
                        continue
                    yield record
        except ray.exceptions.RayError as err:
            kind, message = _worker_error(err)
            raise ClusterError(message, kind=kind) from err

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt))\b: (.*)$")


def _worker_error(err: BaseException) -> tuple[str, str]:
    """(exception class name, message) of what went wrong on the worker: the last `SomeError: message` line of
    Ray's report (the root cause comes last)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = [match for line in lines if (match := _EXCEPTION_LINE.match(line))]
    if found:
        kind, message = found[-1].group(1), found[-1].group(2)
    else:
        kind, message = type(err).__name__, lines[-1] if lines else ""
    return kind, message if len(message) <= 300 else message[:297] + "..."
