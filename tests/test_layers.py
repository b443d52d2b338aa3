"""The package's structure: modules import downward, front end -> evaluation -> pipeline ->
methods -> model -> I/O, with no circles (type-only imports included)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hcconvert"
# A module may import from its own layer and the layers below it.
LAYERS = {"cli": 6, "eval": 5, "pipeline": 4, "methods": 3, "model": 2, "io": 1,
          # shared by every stage
          "errors": 0, "resources": 0, "signals": 0, "kernels": 0, "__init__": 0}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")
            if "kernels" not in path.relative_to(PACKAGE).parts
            and path.name != "__main__.py"}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that name's module imports (relative imports, anywhere in it)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = package[:len(package) - (node.level - 1)] + (node.module or "").split(".")
        base = ".".join(part for part in base if part)
        for alias in node.names:
            target = f"{base}.{alias.name}".strip(".")
            found.add(target if target in known else base)
    return {target for target in found if target in known and target not in (name, "__init__")}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer(name: str) -> int:
    return LAYERS[name.split(".")[0]]


def test_every_module_has_a_layer():
    assert all(name.split(".")[0] in LAYERS for name in graph())


def test_no_module_imports_upward():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                    if layer(b) > layer(a))
    assert not upward


def test_no_import_circles():
    edges = graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        for target in sorted(edges[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])
