"""`kosmos2 serve`: the model behind an HTTP API and a web page, shared by many clients (DESIGN §8)."""

from typing import Annotated

import typer

from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.cli.options import Settings, with_options

PANEL = "Service"
_NOT_SERVING = ("json", "draw", "annotate_dir", "workers", "batch_size", "num_beams")


@with_options(exclude=_NOT_SERVING)
def serve(
    host: Annotated[str, typer.Option("--host", metavar="HOST", rich_help_panel=PANEL,
                                      help="Address to listen on (not loopback: --token is required).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", min=0, max=65535, rich_help_panel=PANEL,
                                      help="TCP port (0: a free one).")] = 8000,
    token: Annotated[str | None, typer.Option("--token", metavar="TOKEN", envvar="KOSMOS2_TOKEN",
                                              rich_help_panel=PANEL, show_default=False,
                                              help="Clients must send Authorization: Bearer TOKEN.")] = None,
    max_rows: Annotated[int, typer.Option("--max-rows", metavar="N", min=0, rich_help_panel=PANEL,
                                          help="Most prompts decoding at once (0: as many as fit the device; 8 on "
                                               "a CPU).")] = 0,
    max_queue: Annotated[int, typer.Option("--max-queue", metavar="N", min=1, rich_help_panel=PANEL,
                                           help="Most requests waiting for the model (503 past it).")] = 256,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", metavar="MB", min=0.001, rich_help_panel=PANEL,
                                                 help="Largest image upload (413 past it).")] = 20.0,
    settings: Settings = None,
) -> None:
    """Serve the model over HTTP: a JSON API, a web page at /, health, info and Prometheus metrics.

    Concurrent requests are batched together on the device. --max-new-tokens is each answer's default and most;
    the sampling options are the requests' defaults. SIGTERM stops accepting, finishes what is in flight, exits 0.

    Example: kosmos2 serve --port 8000   then   curl -F image=@photo.jpg http://127.0.0.1:8000/v1/caption
    """
    try:
        from kosmos2_cli.serve import Limits, Service
        from kosmos2_cli.serve.server import ServeError, check_host, listen, run
    except ImportError as err:
        raise CliError(f"kosmos2 serve needs the serve extra ({err.name} is missing): "
                       "pip install 'kosmos2-cli[serve]'") from err
    from kosmos2_cli.cli.common import interruptible
    from kosmos2_cli.cli.render import Reporter
    from kosmos2_cli.cli.session import open_engine, refill_share
    from kosmos2_cli.runtime.engine import ModelLoadError

    reporter = Reporter(quiet=settings.quiet)
    for warning in settings.check():
        if "only apply with --sample" not in warning:
            reporter.warning(warning)
    try:
        check_host(host, token)
    except ServeError as err:
        raise CliError(f"{err}; give one with --token (or KOSMOS2_TOKEN), or serve on 127.0.0.1") from err
    limits = Limits(rows=max_rows, queue=max_queue, upload_bytes=int(max_upload_mb * (1 << 20)),
                    max_new_tokens=settings.max_new_tokens)
    with interruptible():
        try:
            sock = listen(host, port)
        except ServeError as err:
            raise CliError(str(err)) from err
        engine = open_engine(settings, reporter)
        try:
            if not settings.quiet:
                reporter.note(f"loading {settings.model}")
            engine.load()
        except ModelLoadError as err:
            raise CliError.of(err, ExitCode.MODEL) from err
        service = Service.build(engine, settings.model, limits, token, refill_share=refill_share(),
                                notice=reporter.warning)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host

        def started() -> None:
            reporter.note(f"serving {settings.model} on http://{shown}:{bound_port} ({service.scheduler.rows} rows; "
                          "SIGTERM or Ctrl-C drains and stops)", style="green")

        run(service.app, sock, log_level="warning" if settings.quiet else "info", on_started=started)
    raise typer.Exit(ExitCode.OK)
