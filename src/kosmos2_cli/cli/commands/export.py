"""`kosmos2 export`: a batch's records as a detection dataset: COCO, YOLO or Label Studio (DESIGN §10)."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kosmos2_cli.cli.errors import CliError, ExitCode


class Format(str, Enum):
    coco = "coco"
    yolo = "yolo"
    labelstudio = "labelstudio"


def export(
    results: Annotated[Path, typer.Argument(metavar="RESULTS.jsonl", show_default=False,
                                            help="Records of kosmos2 batch (--task ground or caption), or of "
                                                 "--json.")],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="coco: one JSON file; yolo: a folder (labels/, "
                                                                "data.yaml); labelstudio: tasks with predictions "
                                                                "(JSON) and their labeling config (.xml).")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT", show_default=False,
                                         help="The file (coco, labelstudio) or folder (yolo) to write.")],
    min_score: Annotated[float | None, typer.Option("--min-score", metavar="S", min=0.0, max=1.0,
                                                    help="Keep only boxes scored S or more (0..1).")] = None,
    classes: Annotated[Path | None, typer.Option("--classes", metavar="FILE", dir_okay=False,
                                                 help="Class names, one a line: the categories and their order; "
                                                      "boxes of other phrases are dropped.")] = None,
    copy_images: Annotated[bool, typer.Option("--copy-images", help="yolo: copy the images into OUT/images/ "
                                                                    "beside OUT/labels/, ready to train.")] = False,
    url_prefix: Annotated[str, typer.Option("--url-prefix", metavar="PREFIX",
                                            help="labelstudio: put before each image path, e.g. "
                                                 "'/data/local-files/?d=' for its local storage.")] = "",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary line.")] = False,
) -> None:
    """Turn batch records into a detection dataset; categories are the phrases (case and spaces normalized).

    Boxes are pixels of the picture as seen; error records are skipped and counted.

    Example: kosmos2 export labels.jsonl --format coco -o dataset.json --min-score 0.3
    """
    from kosmos2_cli.cli.render import Reporter
    from kosmos2_cli.datasets.export import export as run_export
    from kosmos2_cli.datasets.records import DatasetError, read_classes

    reporter = Reporter(quiet=quiet)
    try:
        names = read_classes(classes) if classes is not None else None
        summary = run_export(results, fmt.value, output, min_score=min_score, classes=names,
                             copy_images=copy_images, url_prefix=url_prefix)
    except DatasetError as err:
        raise CliError(str(err)) from err
    left = []
    if summary.error_records:
        left.append(f"{summary.error_records} error record(s)")
    if summary.below_score:
        left.append(f"{summary.below_score} box(es) under --min-score")
    if summary.other_classes:
        left.append(f"{summary.other_classes} box(es) of phrases not in --classes")
    skipped = f"; skipped {', '.join(left)}" if left else ""
    extra = f" (labeling config: {summary.config})" if summary.config else ""
    reporter.note(f"{summary.format}: {summary.images} image(s), {summary.boxes} box(es), {summary.categories} "
                  f"categor{'y' if summary.categories == 1 else 'ies'} → {summary.output}{extra}{skipped}",
                  style="green")
    raise typer.Exit(ExitCode.OK)
