"""The orchestrator's import graph: one-way layers, no cycles, boto3's DynamoDB conditions only in the store,
no tools in the product, and a light cold import for the Lambda. Read from the source (ast), so an import
inside a function or under TYPE_CHECKING counts too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHALICELIB = ROOT / "chalicelib"

# Lower layers never import higher ones. Adding a module means placing it here (and in design.md's table).
LAYERS = {
    # 0: basics
    "__init__": 0,
    "errors": 0,
    "clock": 0,
    "schema": 0,
    "observability": 0,
    # 1: pure domain (no AWS)
    "settings": 1,
    "states": 1,
    "callers": 1,
    "jobs": 1,
    "tasks": 1,
    "record": 1,
    "listing": 1,
    "taskdefs": 1,
    "certs": 1,
    # 2: adapters (the only modules that talk to AWS)
    "store": 2,
    "ecs": 2,
    "kms": 2,
    "registry": 2,
    # 3: use cases
    "context": 3,
    "launch": 3,
    "observe": 3,
    "stop": 3,
    "hostkeys": 3,
    "pool": 3,
    # 4: what the edges call
    "service": 4,
    "events": 4,
    "reaper": 4,
    "factory": 4,
}
TOOLS = ("fargate_ci_driver", "local_driver", "sandbox", "runner_emulator", "tests", "bench")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names (relative imports are not used here)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            found.add(node.module or "")
            # `from chalicelib import launch` imports the module chalicelib.launch
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {path.stem: _imports(path) for path in sorted(CHALICELIB.glob("*.py"))}


def _local(imported: set[str]) -> set[str]:
    return {
        name.split(".")[1] for name in imported if name.startswith("chalicelib.") and name.count(".") == 1
    }


def _local_modules(imported: set[str]) -> set[str]:
    return {m for m in _local(imported) if m in MODULES}


def test_every_module_has_a_layer():
    assert sorted(MODULES) == sorted(LAYERS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_import_only_their_own_layer_or_lower_ones(module):
    higher = {m: LAYERS[m] for m in _local_modules(MODULES[module]) if LAYERS[m] > LAYERS[module]}
    assert not higher, f"chalicelib.{module} (layer {LAYERS[module]}) imports {higher}"


def test_chalicelib_has_no_import_cycles():
    graph = {m: _local_modules(imports) - {m} for m, imports in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert done == set(graph)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_product_never_imports_the_tools(module):
    tools = {name for name in MODULES[module] if name.split(".")[0] in TOOLS}
    assert not tools, f"chalicelib.{module} imports {tools}"


def test_app_never_imports_the_tools():
    tools = {name for name in _imports(ROOT / "app.py") if name.split(".")[0] in TOOLS}
    assert not tools


def test_only_the_store_builds_dynamodb_conditions():
    users = sorted(
        m for m, imports in MODULES.items() if any(i.startswith("boto3.dynamodb") for i in imports)
    )
    assert users == ["store"]
    assert not any(i.startswith("boto3.dynamodb") for i in _imports(ROOT / "app.py"))


def test_only_the_adapters_and_the_factory_that_builds_them_load_boto3_or_botocore():
    users = sorted(
        m for m, imports in MODULES.items() if any(i.split(".")[0] in ("boto3", "botocore") for i in imports)
    )
    assert users == ["ecs", "factory", "kms", "registry", "store"]


def test_the_lambdas_cold_import_loads_no_boto3_and_no_adapter():
    probe = (
        "import sys, app; "
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'boto3' "
        "or m in ('chalicelib.store', 'chalicelib.ecs', 'chalicelib.service'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""


def test_design_md_names_every_module_in_its_orchestrator_table():
    design = (ROOT / "docs" / "design.md").read_text()
    table = design.split("## Orchestrator modules and the transition table", 1)[1].split("\n\n")[1]
    missing = [m for m in LAYERS if m != "__init__" and f"`{m}`" not in table]
    assert not missing
