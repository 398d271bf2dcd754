"""The import graph's layers (design.md "Folder layout"): products never import tools, the orchestrator (which
the Lambda ships without the driver) never imports the driver, and the driver's modules import each other
without cycles. Read from the sources (every import, those inside functions too; not TYPE_CHECKING blocks)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = "fargate_ci_driver"
TOOLS = ("sandbox", "runner_emulator", "tests", "bench", "scripts", "infra")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module `path` imports (for `from a import b`: `a`, and `a.b` in case b is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def sources(*tops: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for top in tops:
        where = ROOT / top
        for path in [where] if where.suffix == ".py" else sorted(where.rglob("*.py")):
            files[module_name(path)] = path
    return files


def first_part(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(
    ("product", "forbidden"),
    [
        (DRIVER, (*TOOLS, "chalicelib", "app")),
        ("chalicelib", (*TOOLS, DRIVER)),
        ("app.py", (*TOOLS, DRIVER)),
    ],
)
def test_products_never_import_tools_nor_each_other(product, forbidden):
    bad = {
        f"{module} imports {name}"
        for module, path in sources(product).items()
        for name in imported(path)
        if first_part(name) in forbidden
    }
    assert bad == set()


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for nxt in sorted(graph[module]):
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    return cycles


def test_the_driver_has_no_import_cycles():
    modules = sources(DRIVER)
    graph = {m: {n for n in imported(p) if n in modules and n != m} for m, p in modules.items()}
    assert len(graph) > 20 and graph[f"{DRIVER}.cli"]  # it read the driver
    assert find_cycles(graph) == []


def test_the_checks_can_fail(tmp_path):
    """A lazy import inside a function counts, a TYPE_CHECKING one does not; a cycle is found."""
    source = tmp_path / "a.py"
    source.write_text(
        "TYPE_CHECKING = False\nif TYPE_CHECKING:\n    import bench\n"
        "def f():\n    from pkg import b\n    import sandbox.control\n"
    )
    assert imported(source) == {"pkg", "pkg.b", "sandbox.control"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


# design.md "Driver layout": each layer imports only its own and the layers before it.
LAYERS = [
    "__init__ flags pids job_marker errors agent agent.protocol agent.client agent.fastpath",
    "settings job logs metadata keys attempts api ssh heartbeat report backoff exit_status signals",
    "transport agent.sessions agent.server agent.__main__",
    "context",
    "prepare run cleanup runner_config status",
    "cli __main__",
]


def test_the_driver_imports_only_its_own_and_earlier_layers():
    rank = {
        DRIVER if name == "__init__" else f"{DRIVER}.{name}": n
        for n, layer in enumerate(LAYERS)
        for name in layer.split()
    }
    modules = sources(DRIVER)
    assert set(modules) == set(rank)
    upward = {
        f"{module} imports {name}"
        for module, path in modules.items()
        for name in imported(path)
        if name in rank and rank[name] > rank[module]
    }
    assert upward == set()


def test_the_design_layout_lists_every_driver_module():
    design = (ROOT / "docs" / "design.md").read_text()
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / DRIVER).rglob("*.py"))
        if f"`{path.relative_to(ROOT / DRIVER)}`" not in design
    ]
    assert missing == []
