"""The house rules of streams/ (docs/architecture.md, "The map"): each folder is a concern,
and the pure core imports nothing of ours outside the core, and no client or I/O library."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streams"
FOLDERS = {"core", "worker", "faust_patches", "kafka", "metrics", "tools"}
TOP_LEVEL = {"__init__.py", "__main__.py", "config.py"}
# Clients and I/O libraries: the core gets bytes and gives plans, it never talks to anything.
NOT_IN_CORE = {"faust", "mode", "aiokafka", "confluent_kafka", "kafka", "aiohttp",
               "prometheus_client", "rich", "yaml"}


def imports(source: str, package: str) -> set[str]:
    """Absolute names of every module `source` (a module of `package`) imports."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module or "")
    return names


def core_violations(source: str) -> list[str]:
    """What a module of the core imports that the core may not."""
    found = []
    for name in sorted(imports(source, "streams.core")):
        top = name.split(".")[0]
        if (top == "streams" and not name.startswith("streams.core")) or top in NOT_IN_CORE:
            found.append(name)
    return found


def test_every_module_lives_in_the_folder_of_its_concern() -> None:
    assert {p.name for p in PACKAGE.glob("*.py")} == TOP_LEVEL
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} \
        == FOLDERS


def test_the_core_imports_only_the_core() -> None:
    for path in sorted((PACKAGE / "core").glob("*.py")):
        assert core_violations(path.read_text()) == [], f"{path.name}: the core does no I/O"


# What each folder may import of ours (the map in docs/architecture.md).
ALLOWED = {
    "core": {"core"},
    "kafka": {"core", "config", "kafka"},
    "metrics": {"core", "config", "metrics"},
    "faust_patches": {"core", "kafka", "faust_patches"},
    "worker": {"core", "config", "kafka", "metrics", "faust_patches", "worker", ""},
    "tools": FOLDERS | {"config", ""},
}


def test_each_folder_imports_only_what_the_map_allows() -> None:
    for folder, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / folder).glob("*.py")):
            ours = {name.split(".")[1] if "." in name else ""
                    for name in imports(path.read_text(), f"streams.{folder}")
                    if name.split(".")[0] == "streams"}
            assert ours <= allowed, f"streams/{folder}/{path.name} imports {ours - allowed}"


def test_the_rule_sees_a_forbidden_import() -> None:
    source = ("from streams.kafka.reader import reader\nimport aiokafka.errors\n"
              "from ..worker import app\nfrom . import kpis\nfrom .events import parse_event\n"
              "import orjson\n")
    assert core_violations(source) == ["aiokafka.errors", "streams.kafka.reader",
                                       "streams.worker"]


def test_no_function_of_the_worker_is_longer_than_a_screen() -> None:
    """State passed explicitly, steps named: a worker function fits on a screen."""
    for path in sorted((PACKAGE / "worker").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}: {node.name} has {length} lines"
