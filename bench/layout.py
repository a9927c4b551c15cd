"""The code's layout against the project's floors: file and function sizes, import cycles, the fit path.

``python -m bench.layout`` prints, for the library packages (``trainer``, ``models``,
``trainer_datasets``, ``recipes``):

- every file over ``MAX_FILE_LINES`` lines;
- every function over ``MAX_FUNCTION_LINES`` lines (from its ``def`` to its last line, its
  docstring not counted);
- every import cycle between the project's modules, imports inside functions included;
- the project files that importing ``trainer.core`` loads (module-level imports, package
  ``__init__``s included), with their lines.

It exits 1 when a floor is not kept, so it runs beside the linters (``--quiet``: only what breaks one).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 45
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "trainer": "trainer",
    "models": "models",
    "trainer_datasets": "datasets/trainer_datasets",
    "recipes": "recipes",
}


def modules(root: Path) -> dict[str, Path]:
    """Map each library module's dotted name to its file."""
    found = {}
    for package, folder in PACKAGES.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = [package, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, module: str, is_package: bool, level: int, known: dict[str, Path]) -> str | None:
    if level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        name = ".".join([*base, name] if name else base)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path, known: dict[str, Path], top_level_only: bool, parents: bool) -> set[str]:
    """The project modules ``module`` imports (only at module level when ``top_level_only``).

    With ``parents``, also the packages whose ``__init__`` runs first (importing ``a.b.c`` runs
    ``a`` and ``a.b``): what gets loaded. Without, only the modules named: what depends on what.
    """
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    nodes = _statements(tree, into_functions=not top_level_only)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = node.module or ""
            names = [(f"{prefix}.{alias.name}" if prefix else alias.name, node.level) for alias in node.names]
        else:
            continue
        for name, level in names:
            target = _resolve(name, module, is_package, level, known)
            if target and target != module:
                found.add(target)
                parent = target.rpartition(".")[0] if parents else ""
                while parent:
                    if parent in known and parent != module:
                        found.add(parent)
                    parent = parent.rpartition(".")[0]
    return found


def _statements(tree: ast.Module, into_functions: bool):
    """Every statement that runs an import, ``if TYPE_CHECKING`` blocks left out (they never run)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not into_functions:
            continue
        else:
            yield node
            stack.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def long_functions(path: Path) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of the functions in ``path`` longer than ``MAX_FUNCTION_LINES``."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                if ast.get_docstring(child, clean=False) is not None:
                    doc = child.body[0]
                    lines -= (doc.end_lineno or doc.lineno) - doc.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append((prefix + child.name, lines))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text()), "")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def loaded_by(start: str, graph: dict[str, set[str]]) -> set[str]:
    """Every module importing ``start`` loads (its packages' ``__init__`` included)."""
    seen = set()
    todo = [start]
    parent = start.rpartition(".")[0]
    while parent:
        todo.append(parent)
        parent = parent.rpartition(".")[0]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def main(argv: list[str] | None = None) -> int:
    """Print the layout report; return 1 when a floor is not kept."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to read (default: this one)")
    parser.add_argument("--quiet", action="store_true", help="print only what breaks a floor (for make lint)")
    args = parser.parse_args(argv)
    known = modules(args.root)
    failed = False
    for name, path in known.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            print(f"file over {MAX_FILE_LINES} lines: {path.relative_to(args.root)} ({lines})")
            failed = True
        for function, length in long_functions(path):
            print(f"function over {MAX_FUNCTION_LINES} lines: {name}.{function} ({length})")
            failed = True
    full = {name: imports(name, path, known, top_level_only=False, parents=False) for name, path in known.items()}
    for component in cycles(full):
        print("import cycle: " + " <-> ".join(component))
        failed = True
    if args.quiet:
        return 1 if failed else 0
    top = {name: imports(name, path, known, top_level_only=True, parents=True) for name, path in known.items()}
    fit_path = sorted(loaded_by("trainer.core", top))
    total = sum(len(known[name].read_text().splitlines()) for name in fit_path)
    print(f"import trainer.core loads {len(fit_path)} project files, {total} lines:")
    for name in fit_path:
        print(f"  {known[name].relative_to(args.root)} ({len(known[name].read_text().splitlines())})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
