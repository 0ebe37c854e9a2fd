"""`kosmos2 ask`: the answer to a question about the picture, with the answer's phrases located."""

from pathlib import Path
from typing import Annotated

import typer

from kosmos2_cli.cli.common import run_and_exit, task_spec
from kosmos2_cli.cli.errors import CliError
from kosmos2_cli.cli.options import Settings, with_options


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
    images = list(arguments)
    if question is None:
        if len(images) < 2:
            raise CliError("ask needs images and then a question, e.g. kosmos2 ask photo.jpg \"What is this?\"")
        question = images.pop()
        if Path(question).exists():
            raise CliError(f"the last argument must be the question, but {question!r} is a file or folder "
                           "(or pass --question)")
    run_and_exit(task_spec("ask", question=question), images, settings)
