"""What the command modules share: the IMAGE argument, turning a task's arguments into a checked spec, Ctrl-C."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kosmos2_cli.cli.errors import CliError, ExitCode

if TYPE_CHECKING:
    from kosmos2_cli.api.tasks import TaskSpec
    from kosmos2_cli.cli.options import Settings

Images = Annotated[list[str], typer.Argument(metavar="IMAGE", show_default=False,
                                             help="Image files, folders (searched recursively) or globs.")]


def task_spec(task: str, **args: Any) -> TaskSpec:
    """The checked TaskSpec, or a usage error in the API's words (an empty phrase, a malformed box...)."""
    from kosmos2_cli.api.prompts import PromptError
    from kosmos2_cli.api.tasks import TaskSpec

    try:
        return TaskSpec.build(task, **args)
    except PromptError as err:
        raise CliError.of(err) from err


def run_and_exit(spec: TaskSpec, images: list[str], settings: Settings) -> None:
    """`caption`, `ground`, `refer`, `ask`: the task over the images, results on the terminal; exit with its code."""
    from kosmos2_cli.cli.show import run_task

    exit_with(lambda: run_task(spec, images, settings))


def exit_with(work: Callable[[], ExitCode]) -> None:
    """Run `work` and exit with its code; Ctrl-C is one line and status 130 (Typer would exit silently)."""
    with interruptible():
        code = work()
    raise typer.Exit(code)


@contextmanager
def interruptible() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt as err:
        raise CliError("interrupted", ExitCode.INTERRUPTED) from err
