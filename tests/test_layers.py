"""The package's imports point down a declared layer order, and no modules import each other
in a circle (lazy imports inside functions count too). What two layers share moves down."""

from __future__ import annotations

import ast
from pathlib import Path

import draftwise

ROOT = Path(draftwise.__file__).parent

# bottom to top: a module may import from its own layer or the ones below
LAYERS = [
    ["errors", "paths", "version"],
    ["kernels", "constraints"],
    ["cache", "sampling", "sampling_params", "metrics"],
    ["models", "verify", "request", "outputs", "config", "tree", "heads", "toolcalls"],
    ["speculators"],
    ["engine"],
    ["api", "server", "train", "bench"],
    ["commands", "cli", "__main__", "__init__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("draftwise",) + tuple(p for p in parts if p != "__init__")) if parts != ("__init__",) \
        else "draftwise"


def imports() -> dict[str, set[str]]:
    """module -> the draftwise modules it imports anywhere in its file."""
    known = {module_name(p) for p in ROOT.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        me = module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("draftwise"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("draftwise")]
            else:
                continue
            found |= {n for n in names if n in known and n != me}
        out[me] = found
    return out


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    assert top in LAYER, f"{module}: put {top!r} in a layer of tests/test_layers.py"
    return LAYER[top]


def test_imports_point_down():
    upward = sorted(f"{m} -> {t}" for m, ts in imports().items() for t in ts
                    if m != "draftwise" and layer(t) > layer(m))
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = {m: {t for t in ts if t != "draftwise"} for m, ts in imports().items() if m != "draftwise"}
    # a package's __init__ importing its own modules is not a circle of its modules
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    circles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t):] + [m, t]) if t in stack else f"{m} -> {t}")
            elif t not in state:
                visit(t, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_speculator_families_are_reached_through_their_front_door():
    """A family of modules under speculators/ (a folder: eagle/, adaptive/, layer_skip/) is
    imported from outside only through its `__init__`; its modules are its own business."""
    families = {m for m in imports() if m.count(".") == 2 and m.startswith("draftwise.speculators.")
                and (ROOT / "speculators" / m.split(".")[2] / "__init__.py").is_file()}
    inside = sorted(f"{m} -> {t}" for m, ts in imports().items() for t in ts for fam in families
                    if t.startswith(fam + ".") and not (m == fam or m.startswith(fam + ".")))
    assert families >= {"draftwise.speculators.eagle", "draftwise.speculators.adaptive"}
    assert not inside, "imports of a family's internals from outside it:\n" + "\n".join(inside)
