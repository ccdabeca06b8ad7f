"""Imports point down the data flow: the layers in docs/architecture.md, checked over every import in src/peftlab."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "peftlab"


def documented_layers() -> dict[str, int]:
    """Module name (without ``peftlab.``) -> layer number, from the list between the markers of the doc."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("<!-- layers:begin -->")[1].split("<!-- layers:end -->")[0]
    layers = {}
    for number, names in re.findall(r"^(\d+)\. (.+?) —", block, flags=re.MULTILINE):
        for name in re.findall(r"`([\w.]+)`", names):
            layers[name] = int(number)
    return layers


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "peftlab"


def imported_modules(path: Path, modules: set[str], own: str = "") -> set[str]:
    """peftlab modules ``path`` imports, at module level or inside functions (the facade's version aside)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "peftlab":
            base = node.module.removeprefix("peftlab").removeprefix(".")
            for alias in node.names:  # `from peftlab import artifacts` imports a module, not a name
                sub = f"{base}.{alias.name}".lstrip(".")
                found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("peftlab.") for a in node.names if a.name.startswith("peftlab.")}
    return found - {"", own}  # "": `from peftlab import __version__`, allowed everywhere


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest documented name that is the module or a package above it."""
    for cut in range(module.count(".") + 1, 0, -1):
        name = ".".join(module.split(".")[:cut])
        if name in layers:
            return layers[name]
    return None


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules, module_name(p)) for p in paths}


def test_the_doc_lists_layers_and_every_module_has_one() -> None:
    layers = documented_layers()
    assert layers["errors"] == 1 and layers["artifacts"] < layers["predict"] < layers["cli"]
    unlisted = sorted(m for m in import_graph() if layer_of(m, layers) is None)
    assert not unlisted, f"modules missing from docs/architecture.md's layer list: {unlisted}"


def test_no_module_imports_a_layer_below_it() -> None:
    layers = documented_layers()
    upward = [f"{module} (layer {layer_of(module, layers)}) imports {dep} (layer {layer_of(dep, layers)})"
              for module, deps in import_graph().items() for dep in sorted(deps)
              if layer_of(dep, layers) > layer_of(module, layers)]
    assert not upward, "imports against docs/architecture.md's layers:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = import_graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for dep in sorted(graph.get(module, ())):
            if cycle := visit(dep, path + [module]):
                return cycle
        done.add(module)
        return None

    cycles = [c for c in (visit(m, []) for m in sorted(graph)) if c]
    assert not cycles, f"import cycle: {' -> '.join(cycles[0])}"


def test_the_check_sees_lazy_and_package_imports(tmp_path: Path) -> None:
    """The parser finds an import inside a function and resolves `from peftlab import x` to the module x."""
    source = tmp_path / "mod.py"
    source.write_text("from peftlab import fsutil, __version__\n\ndef f():\n    from peftlab.generate import generate\n")
    assert imported_modules(source, {"fsutil", "generate"}) == {"fsutil", "generate"}
