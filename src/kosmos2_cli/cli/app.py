"""The `kosmos2` command: its commands, arguments and help, and how errors become one line and an exit code.

Nothing heavy is imported here: torch, the model and OpenCV load inside the commands that need them, so
`kosmos2 --help` answers at once.
"""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
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
from kosmos2_cli.cli.options import Settings, with_options
from kosmos2_cli.model.hub import DEFAULT_MODEL


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


Images = Annotated[list[str], typer.Argument(metavar="IMAGE", show_default=False,
                                             help="Image files, folders (searched recursively) or globs.")]


@app.command()
@with_options()
def caption(
    images: Images,
    detailed: Annotated[bool, typer.Option("--detailed", "-d", help="A detailed description instead of a "
                                                                    "one-line caption.")] = False,
    settings: Settings = None,
) -> None:
    """Caption images, with the phrases of the caption located on the image.

    Example: kosmos2 caption photo.jpg --draw photo.boxes.png
    """
    from kosmos2_cli.api.tasks import TaskSpec

    _run(TaskSpec.build("caption", detailed=detailed), images, settings)


@app.command()
@with_options()
def ground(
    images: Images,
    phrase: Annotated[list[str], typer.Option("--phrase", "-p", metavar="TEXT", show_default=False,
                                              help="What to find, e.g. 'a red car'; repeat for several.")] = [],  # noqa: B006
    settings: Settings = None,
) -> None:
    """Find phrases on images: a box for each phrase the model places, 'not found' for the others.

    The image is encoded once for all phrases, which are generated as one batch.

    Example: kosmos2 ground street.jpg -p "a bus" -p "a traffic light"
    """
    from kosmos2_cli.api.tasks import TaskSpec

    _run(_spec(TaskSpec.build, "ground", phrases=phrase), images, settings)


@app.command()
@with_options()
def refer(
    images: Images,
    box: Annotated[str, typer.Option("--box", metavar="X1,Y1,X2,Y2", show_default=False,
                                     help="The region: pixels of the image as you see it (top-left x,y then "
                                          "bottom-right x,y), or 0..1 with --normalized.")],
    normalized: Annotated[bool, typer.Option("--normalized", help="--box is in 0..1 of the width and "
                                                                  "height.")] = False,
    settings: Settings = None,
) -> None:
    """Describe what is inside a box of the image.

    Example: kosmos2 refer photo.jpg --box 40,60,300,420
    """
    from kosmos2_cli.api.tasks import TaskSpec

    _run(_spec(TaskSpec.build, "refer", box=box, normalized=normalized), images, settings)


@app.command()
@with_options()
def ask(
    arguments: Annotated[list[str], typer.Argument(metavar="IMAGE... QUESTION", show_default=False,
                                                   help="Images (files, folders, globs), then the question.")],
    question: Annotated[str | None, typer.Option("--question", metavar="TEXT", show_default=False,
                                                 help="The question, when every argument is an image.")] = None,
    settings: Settings = None,
) -> None:
    """Answer a question about images, with the answer's phrases located on the image.

    Example: kosmos2 ask photo.jpg "What is the man holding?"
    """
    from kosmos2_cli.api.tasks import TaskSpec

    images = list(arguments)
    if question is None:
        if len(images) < 2:
            raise CliError("ask needs images and then a question, e.g. kosmos2 ask photo.jpg \"What is this?\"")
        question = images.pop()
        if Path(question).exists():
            raise CliError(f"the last argument must be the question, but {question!r} is a file or folder "
                           "(or pass --question)")
    _run(_spec(TaskSpec.build, "ask", question=question), images, settings)


class Task(str, Enum):
    caption = "caption"
    ground = "ground"
    refer = "refer"
    ask = "ask"


BATCH = "Task"


@app.command()
@with_options(exclude=("draw",))
def batch(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT", show_default=False,
                                                help="Image files, folders (searched recursively) or globs.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT.jsonl", dir_okay=False, show_default=False,
                                         help="The JSON-lines file: created, or completed when it exists.")],
    task: Annotated[Task, typer.Option("--task", "-t", rich_help_panel=BATCH,
                                       help="What to do with each image.")] = Task.caption,
    detailed: Annotated[bool, typer.Option("--detailed", "-d", rich_help_panel=BATCH,
                                           help="caption: detailed descriptions.")] = False,
    phrase: Annotated[list[str], typer.Option("--phrase", "-p", metavar="TEXT", rich_help_panel=BATCH,
                                              show_default=False, help="ground: a phrase to find; repeat for "
                                                                       "several.")] = [],  # noqa: B006
    box: Annotated[str | None, typer.Option("--box", metavar="X1,Y1,X2,Y2", rich_help_panel=BATCH,
                                            help="refer: the region (pixels, or 0..1 with --normalized).")] = None,
    normalized: Annotated[bool, typer.Option("--normalized", rich_help_panel=BATCH,
                                             help="refer: --box is in 0..1.")] = False,
    question: Annotated[str | None, typer.Option("--question", metavar="TEXT", rich_help_panel=BATCH,
                                                 help="ask: the question.")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Retry the images whose earlier records "
                                                                      "are errors (their records are "
                                                                      "replaced).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start OUT.jsonl afresh instead of resuming "
                                                                "it.")] = False,
    settings: Settings = None,
) -> None:
    """Run one task over many images into a JSON-lines file, one line per image.

    Each line is written whole as soon as its image is done; run the same command again after an interruption
    and it resumes, skipping the images already in the file. Images that cannot be read get an error record
    and the run goes on; the exit status is then 1. With --json, a summary object is printed on stdout.

    Example: kosmos2 batch photos/ -o captions.jsonl          (--task caption is the default)
    """
    from kosmos2_cli.api.tasks import TaskSpec
    from kosmos2_cli.cli.batch import run_batch

    name = task.value
    unused = [flag for flag, value, owner in (("--detailed", detailed, "caption"), ("--phrase", phrase, "ground"),
                                              ("--box", box, "refer"), ("--normalized", normalized, "refer"),
                                              ("--question", question, "ask")) if value and owner != name]
    if unused:
        raise CliError(f"{', '.join(unused)} do(es) not apply to --task {name}")
    spec = _spec(TaskSpec.build, name, detailed=detailed, phrases=phrase, box=box, normalized=normalized,
                 question=question)
    if retry_failed and overwrite:
        raise CliError("--retry-failed and --overwrite do not go together")
    with _interruptible():
        code = run_batch(spec, inputs, output, settings, overwrite=overwrite, retry_failed=retry_failed)
    raise typer.Exit(code)


@app.command()
def download(
    model: Annotated[str, typer.Option("--model", "-m", metavar="REPO", envvar="KOSMOS2_MODEL",
                                       help="Hub repo id to fetch.")] = DEFAULT_MODEL,
    revision: Annotated[str | None, typer.Option("--revision", metavar="REV",
                                                 help="Hub branch, tag or commit.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Fetch the model into the Hugging Face cache ahead of time (only the files kosmos2 reads).

    Honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN.
    """
    from kosmos2_cli.cli.system import download_model

    raise typer.Exit(download_model(model, revision, quiet=quiet))


@app.command()
def info(
    model: Annotated[str, typer.Option("--model", "-m", metavar="REPO|DIR", envvar="KOSMOS2_MODEL",
                                       help="The model to look for.")] = DEFAULT_MODEL,
    revision: Annotated[str | None, typer.Option("--revision", metavar="REV")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="As one JSON object.")] = False,
) -> None:
    """Show versions, the device and dtype 'auto' picks, CUDA, and whether the model is cached. Never downloads."""
    from kosmos2_cli.cli.system import show_info

    show_info(model, revision, json_output)


def _spec(build, task: str, **args):
    from kosmos2_cli.api.prompts import PromptError

    try:
        return build(task, **args)
    except PromptError as err:
        raise CliError(str(err)) from err


def _run(spec, images: list[str], settings: Settings) -> None:
    from kosmos2_cli.cli.run import run_task

    with _interruptible():
        code = run_task(spec, images, settings)
    raise typer.Exit(code)


@contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C: one line and exit status 130 (Typer would exit silently)."""
    try:
        yield
    except KeyboardInterrupt as err:
        raise CliError("interrupted", ExitCode.INTERRUPTED) from err


def main() -> None:
    """The console script."""
    app()
