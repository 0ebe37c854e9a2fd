"""`kosmos2 batch --ray`: the images answered on a Ray cluster (`kosmos2_cli.distributed`, DESIGN §9), for
`batch.run_ray_batch`, which keeps plain batch's output file, resume, summary and exit codes.

The driver lists the inputs and drops what OUT already holds before it submits anything; records come back in
any order and each is written whole and flushed as it arrives, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from kosmos2_cli.api.tasks import TaskSpec, record_key, spec_key
from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.cli.options import Settings
from kosmos2_cli.cli.render import Reporter

if TYPE_CHECKING:
    from kosmos2_cli.distributed.listing import Listing


def cluster_address(value: str | None) -> str | None:
    """`--ray-address`: None (RAY_ADDRESS, a cluster running here, or a new local one), auto, local or an
    address (HOST:PORT, ray://HOST:PORT)."""
    if value is None:
        return None
    value = value.strip()
    if value in ("auto", "local") or ":" in value:
        return value
    raise CliError(f"--ray-address {value!r}: not auto, local or a cluster address HOST:PORT")


def start(settings: Settings, inputs: Sequence[str], ray_address: str | None,
          reporter: Reporter) -> tuple[str | None, Listing]:
    """(the cluster's address, the images of the inputs), once the options are checked and Ray is found."""
    address = cluster_address(ray_address)
    try:
        from kosmos2_cli.distributed.driver import RayUnavailable, require_ray

        require_ray()
    except RayUnavailable as err:
        raise CliError.of(err) from err
    from kosmos2_cli.distributed.listing import list_inputs
    from kosmos2_cli.runtime.inputs import InputError

    if settings.annotate_dir:
        raise CliError("--annotate-dir does not go with --ray (the pictures stay on the cluster's workers)")
    for warning in settings.check():
        reporter.warning(warning)
    if settings.workers:
        reporter.warning("--workers does not apply with --ray: Ray's CPU tasks prepare the images")
    try:
        return address, list_inputs(inputs)
    except InputError as err:
        raise CliError.of(err) from err


def retry_predicate(spec: TaskSpec, output: Path, listing: Listing):
    """--retry-failed: which error records to drop (this query's, for images of the inputs), found by one read of
    the file and one vectorised lookup in the listing (no set of every listed name)."""
    import json

    import pyarrow as pa
    import pyarrow.compute as pc

    failed = []
    if output.is_file():
        with open(output, "rb") as handle:
            for line in handle:
                if b'"error"' not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("image"), str) and "error" in record and \
                        record_key(record) == spec_key(spec, record["image"]):
                    failed.append(record["image"])
    if not failed:
        return lambda record: False
    candidates = pa.array(failed, pa.string())
    chosen = set(candidates.filter(pc.is_in(candidates, value_set=listing.names.combine_chunks())).to_pylist())
    return lambda record: record.get("image") in chosen and record_key(record) == spec_key(spec, record["image"])


def process(spec: TaskSpec, names, results, settings: Settings, address: str | None, actors: int,
            reporter: Reporter, stop_on_sigterm: Callable[[], AbstractContextManager]) -> None:
    """Answer `names` on the cluster, writing each record to `results` as it comes back (once). Ctrl-C and
    SIGTERM (under `stop_on_sigterm`, entered once Ray's core has set its own handlers) come through as
    KeyboardInterrupt, for the caller's summary."""
    from kosmos2_cli.cli.session import find_model, refill_share
    from kosmos2_cli.distributed.driver import Cluster, ClusterError
    from kosmos2_cli.distributed.stages import Job
    from kosmos2_cli.runtime.engine import ModelLoadError, check_model_folder

    folder = find_model(settings.model, settings.revision, reporter)
    try:
        check_model_folder(folder)
    except ModelLoadError as err:
        raise CliError.of(err, ExitCode.MODEL) from err
    share = refill_share()
    with reporter.progress(len(names), "starting Ray") as progress:
        try:
            cluster = Cluster(address)
        except ClusterError as err:
            raise CliError.of(err) from err
        with cluster:
            try:
                device, actors = cluster.plan(settings.device, actors)
            except ClusterError as err:
                raise CliError.of(err) from err
            _check_dtype(settings.dtype, device)
            job = Job(spec, str(folder), settings.model, settings.revision, device, settings.dtype,
                      settings.generation_options(), share, settings.batch_size)
            if progress is not None:
                progress.update(progress.task_ids[0], description=f"{spec.describe()} on {actors} "
                                f"{'GPU' if device == 'cuda' else 'CPU'} actor{'s' * (actors != 1)}")
            try:
                with stop_on_sigterm():
                    for record in cluster.records(job, names, actors, results.done):
                        results.write(record)
                        if "error" in record:
                            reporter.error(record["error"])
                        if progress is not None:
                            progress.advance(progress.task_ids[0])
            except ClusterError as err:
                if err.kind == "ModelLoadError":
                    raise CliError(str(err), ExitCode.MODEL) from err
                raise CliError(f"a Ray worker failed: {err.kind}: {err}", ExitCode.INTERNAL,
                               hint="its traceback is in the Ray session's logs") from err


def _check_dtype(dtype: str, device: str) -> None:
    """A dtype the actors' device cannot take fails here, once, rather than in every actor."""
    import torch

    from kosmos2_cli.model.devices import resolve_dtype

    if dtype.strip().lower() != "auto":  # auto is decided on each actor, by its own GPU
        try:
            resolve_dtype(dtype, torch.device(device))
        except ValueError as err:
            raise CliError.of(err) from err
