"""`kosmos2 ground`: a box for each phrase asked about, or 'not found'."""

from typing import Annotated

import typer

from kosmos2_cli.cli.common import Images, run_and_exit, task_spec
from kosmos2_cli.cli.options import Settings, with_options


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
    run_and_exit(task_spec("ground", phrases=phrase), images, settings)
