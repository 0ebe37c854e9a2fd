"""`kosmos2 refer`: a description of what is inside a box of the image."""

from typing import Annotated

import typer

from kosmos2_cli.cli.common import Images, run_and_exit, task_spec
from kosmos2_cli.cli.options import Settings, with_options


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
    run_and_exit(task_spec("refer", box=box, normalized=normalized), images, settings)
