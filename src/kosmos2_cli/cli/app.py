"""The `kosmos2` command: its commands (one module each under `commands/`), and how errors become one line
and an exit code.

Nothing heavy is imported here: torch, the model and OpenCV load inside the commands that need them, so
`kosmos2 --help` answers at once.
"""

import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

try:  # Typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older Typer on click
    from click.exceptions import ClickException

    class NoArgsIsHelpError(Exception):  # type: ignore[no-redef]
        """Absent before click 8.2."""

from kosmos2_cli import __version__
from kosmos2_cli.cli.errors import CliError, ExitCode


class _Group(TyperGroup):
    """Runs a command and turns every failure into one `error:` line on stderr and a documented exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra: Any):
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("KOSMOS2_DEBUG", "") not in ("", "0")
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError:
            code = ExitCode.USAGE  # the help is already shown
        except ClickException as err:
            _error(err.format_message(), _usage_hint(err))
            code = err.exit_code
        except typer.Abort:
            _error("interrupted")
            code = ExitCode.INTERRUPTED
        except CliError as err:
            _error(str(err), err.hint)
            code = err.code
        except KeyboardInterrupt:
            _error("interrupted")
            code = ExitCode.INTERRUPTED
        except Exception as err:
            if debug:
                raise
            _error(f"unexpected {type(err).__name__}: {err}", "this is a bug; rerun with --debug for the traceback")
            code = ExitCode.INTERNAL
        code = int(code or 0)
        if standalone_mode:
            sys.exit(code)
        return code


def _usage_hint(err: ClickException) -> str | None:
    ctx = getattr(err, "ctx", None)
    return f"see '{ctx.command_path} --help'" if ctx is not None else None


def _error(message: str, hint: str | None = None) -> None:
    from rich.console import Console
    from rich.text import Text

    line = Text.assemble(("error", "bold red"), ": ", " ".join(str(message).split()))
    if hint:
        line.append(f" ({hint})", style="dim")
    Console(stderr=True, highlight=False, soft_wrap=True).print(line)


EXIT_CODES = "Exit codes: 0 ok, 1 some images failed, 2 usage error, 3 model unavailable, 4 internal error, " \
             "130 interrupted."

app = typer.Typer(
    cls=_Group,
    name="kosmos2",
    help="Kosmos-2 grounding on the command line: captions, answers and descriptions whose phrases are linked to "
         "boxes on the image, and boxes for the phrases you ask about.",
    epilog=f"Run 'kosmos2 COMMAND --help' for a command's options. {EXIT_CODES}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kosmos2-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Kosmos-2 grounding on the command line."""


from kosmos2_cli.cli.commands import ask, batch, caption, download, ground, info, refer, serve, train  # noqa: E402

for command in (caption.caption, ground.ground, refer.refer, ask.ask, batch.batch, download.download, info.info,
                serve.serve, train.train):
    app.command()(command)

from kosmos2_cli.cli.commands import convert, eval, export  # noqa: E402  (datasets, DESIGN §10)

for command in (export.export, eval.eval):
    app.command()(command)
app.add_typer(convert.convert)


def main() -> None:
    """The console script."""
    app()
