"""`kosmos2 caption`: 'An image of ...' (or a detailed description) with the caption's phrases located."""

from typing import Annotated

import typer

from kosmos2_cli.cli.common import Images, run_and_exit, task_spec
from kosmos2_cli.cli.options import Settings, with_options


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
    run_and_exit(task_spec("caption", detailed=detailed), images, settings)
