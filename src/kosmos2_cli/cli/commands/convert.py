"""`kosmos2 convert`: public grounding benchmarks' annotations into `kosmos2 eval`'s JSON lines."""

from pathlib import Path
from typing import Annotated

import typer

from kosmos2_cli.cli.errors import CliError, ExitCode

convert = typer.Typer(name="convert", no_args_is_help=True, add_completion=False,
                      help="Write kosmos2 eval's annotation file from RefCOCO/RefCOCO+/RefCOCOg or Flickr30k "
                           "Entities.")

Output = Annotated[Path, typer.Option("--output", "-o", metavar="OUT.jsonl", dir_okay=False, show_default=False,
                                      help="The annotation file to write (one item a line).")]


@convert.command("refcoco")
def refcoco(
    refs: Annotated[Path, typer.Option("--refs", metavar="REFS.json", dir_okay=False, show_default=False,
                                       help="The refs in JSON form (array, {\"refs\": [...]}, or one a line). "
                                            "The released refs(*).p is a pickle and is never loaded: convert it "
                                            "to JSON first.")],
    instances: Annotated[Path, typer.Option("--instances", metavar="instances.json", dir_okay=False,
                                            show_default=False, help="The dataset's COCO instances.json.")],
    output: Output,
    split: Annotated[list[str], typer.Option("--split", metavar="NAME", show_default=False,
                                             help="Only these splits (val, testA, testB, test...); repeat for "
                                                  "several. Default: all.")] = [],  # noqa: B006
    dataset: Annotated[str, typer.Option("--dataset", metavar="NAME",
                                         help="refcoco, refcoco+ or refcocog: names the items' split "
                                              "(\"refcoco/val\").")] = "refcoco",
) -> None:
    """RefCOCO, RefCOCO+ or RefCOCOg: one item per referring sentence, the box of its object.

    The refs must be in JSON form: the released refs(unc).p / refs(umd).p / refs(google).p are Python pickles,
    which can run code when loaded, so they are refused, never unpickled (convert them to JSON once, e.g. with
    json.dump of the unpickled list, or use a JSON conversion of them). Image paths are COCO file names: pass
    the COCO train2014 folder as kosmos2 eval --images.

    Example: kosmos2 convert refcoco --refs refs_unc.json --instances instances.json --split val -o refcoco_val.jsonl
    """
    from kosmos2_cli.datasets.convert import DATASETS, refcoco_items

    if dataset not in DATASETS:
        raise CliError(f"--dataset {dataset!r}: choose from {', '.join(DATASETS)}")
    _write(refcoco_items(refs, instances, dataset=dataset, splits=split), output)


@convert.command("flickr30k")
def flickr30k(
    root: Annotated[Path, typer.Argument(metavar="FOLDER", file_okay=False, show_default=False,
                                         help="Flickr30k Entities' folder with Annotations/ and Sentences/.")],
    output: Output,
    ids: Annotated[Path | None, typer.Option("--ids", metavar="FILE", dir_okay=False,
                                             help="Only these image ids, one a line (the dataset's test.txt, "
                                                  "val.txt...); the file's stem names the split.")] = None,
) -> None:
    """Flickr30k Entities: one item per marked phrase of each sentence whose entity has boxes (any of them counts).

    Example: kosmos2 convert flickr30k flickr30k_entities/ --ids flickr30k_entities/test.txt -o flickr_test.jsonl
    """
    from kosmos2_cli.datasets.convert import flickr30k_items, read_ids

    try:
        chosen = read_ids(ids) if ids is not None else None
    except ValueError as err:
        raise CliError(str(err)) from err
    split = f"flickr30k/{ids.stem}" if ids is not None else "flickr30k"
    _write(flickr30k_items(root, ids=chosen, split=split), output)


def _write(items, output: Path) -> None:
    from kosmos2_cli.cli.render import Reporter
    from kosmos2_cli.datasets.convert import write_items
    from kosmos2_cli.datasets.records import DatasetError

    try:
        count = write_items(items, output)
    except DatasetError as err:
        raise CliError(str(err)) from err
    if not count:
        raise CliError(f"no items: nothing in the input matched (wrong --split or --ids?); {output} not written")
    Reporter().note(f"{count} item(s) → {output}", style="green")
    raise typer.Exit(ExitCode.OK)
