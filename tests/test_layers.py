"""The package's architecture, checked: one folder per layer, every import pointing down, no cycle, small modules.

Every `kosmos2_cli` import counts, also those inside functions and under TYPE_CHECKING: a lazy import is still an
arrow between two modules. The layers, from the top (README, "How it fits together"):
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kosmos2_cli"

# Lower rank = higher layer. A module may import its own layer or any layer of a higher rank number.
LAYERS = {
    "cli": 0,  # argv, options, rendering, drawing: the only layer that knows flags
    "serve": 1,  # kosmos2 serve: HTTP API, web page
    "distributed": 1,  # kosmos2 batch --ray
    "train": 1,  # kosmos2 train
    "datasets": 2,  # box scores' consumers: export, eval, converters
    "runtime": 3,  # the prefetching runner, the engine, the output file
    "api": 4,  # Kosmos2 (scripts' API), tasks, prompts, results, the transformers-style classes
    "processing": 5,  # tokenizer, image processing, post-processing
    "generation": 6,  # decoding, sampling, beam search, the row scheduler
    "fast": 7,  # Triton kernels, CUDA graphs, start-up helpers, module swaps
    "model": 8,  # plain PyTorch modules, config, weights and loading, int8
}
ROOT_MODULES = {"__init__", "__main__"}  # the package's front door: lazy exports and `python -m`
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("kosmos2_cli", *parts))] = path
    return found


MODULES = _modules()


def _imports(path: Path, name: str) -> set[str]:
    """The kosmos2_cli modules that the module `name` imports (anywhere in its body)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                   else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in MODULES else base)
    resolved = set()
    for target in targets:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != "kosmos2_cli" and target != name:
            resolved.add(target)
    return resolved


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] not in ROOT_MODULES else None


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def test_every_module_lives_in_a_known_layer():
    stray = [m for m in MODULES if m not in ("kosmos2_cli", "kosmos2_cli.__main__") and _layer(m) not in LAYERS]
    assert not stray, f"modules outside the layer folders {sorted(LAYERS)}: {stray}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in LAYERS))
def test_imports_point_down(module):
    rank = LAYERS[_layer(module)]
    upward = sorted(t for t in GRAPH[module] if _layer(t) in LAYERS and LAYERS[_layer(t)] < rank)
    assert not upward, f"{module} ({_layer(module)}) imports higher layers: {upward}"
    peers = sorted(t for t in GRAPH[module] if _layer(t) in LAYERS and LAYERS[_layer(t)] == rank
                   and _layer(t) != _layer(module))
    assert not peers, f"{module} imports a sibling layer: {peers}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, set())):
            if _layer(nxt) is None:
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state and _layer(module) is not None:
            visit(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES}: split it by job)"


def test_the_checker_sees_a_planted_upward_import(tmp_path):
    """The rule would fail on a model module importing the CLI: the check is not vacuous."""
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from kosmos2_cli.cli.app import app\n")
    targets = _imports(planted, "kosmos2_cli.model.m")
    assert "kosmos2_cli.cli.app" in targets


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
FRONT_ENDS = {"cli", "serve", "distributed", "train"}  # layers that have flags or a wire format of their own


def _messages(path: Path) -> list[str]:
    """The string constants of a module that are not docstrings (what its errors and warnings can say)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in LAYERS and _layer(m) not in FRONT_ENDS))
def test_lower_layers_name_no_command_line_flag(module):
    """A script's user never typed `--model`: below the front ends, messages say what is wrong in plain words
    and name what to change as `advice`, which the CLI turns into its flags (cli/errors.py ADVICE)."""
    flagged = [text for text in _messages(MODULES[module]) if FLAG.search(text)]
    assert not flagged, f"{module} names command-line flags in: {flagged}"


def test_the_cli_words_the_lower_layers_advice():
    from kosmos2_cli.api.prompts import PromptError
    from kosmos2_cli.cli.errors import ADVICE, CliError

    assert str(CliError.of(PromptError("ground needs at least one phrase", advice="phrase"))) == \
        "ground needs at least one phrase; give one with --phrase"
    assert str(CliError.of(ValueError("plain"))) == "plain"
    assert all(FLAG.search(text) for key, text in ADVICE.items() if key != "download") and "--model" in \
        ADVICE["download"]
