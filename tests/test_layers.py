"""The layering contract (ARCHITECTURE.md §2), over the import graph of the source tree: every import counts, including
imports inside functions and ``TYPE_CHECKING`` blocks. ``make lint`` runs this file.

Bottom to top: core (``edge_qmul`` minus cli / status); devices, then export (export may import devices,
never the reverse); federated; cli and status. The package root ``edge_qmul/__init__.py`` is the facade that
re-exports every layer lazily and belongs to none. ``devices/runtime.py`` (and the ``ed25519.py`` it ships
with in a bundle) import only the standard library, numpy and onnxruntime.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"edge_qmul": ROOT / "edge_qmul", "edge_qmul.export": ROOT / "export",
            "edge_qmul.federated": ROOT / "federated", "edge_qmul.devices": ROOT / "devices"}
TOP = {"edge_qmul.cli", "edge_qmul.status"}
RANK = {"core": 0, "edge_qmul.devices": 1, "edge_qmul.export": 2, "edge_qmul.federated": 3, "top": 4}
RUNTIME_ALLOWED = {"numpy", "onnxruntime", "ed25519", "edge_qmul.devices.ed25519"}  # ed25519: as shipped beside it


def modules() -> dict[str, Path]:
    out = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def layer(module: str) -> str:
    if module in TOP:
        return "top"
    for package in ("edge_qmul.devices", "edge_qmul.export", "edge_qmul.federated"):
        if module == package or module.startswith(package + "."):
            return package
    return "core"


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with its line."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.append((base, node.lineno))
            # ``from edge_qmul import pipeline`` imports the module edge_qmul.pipeline
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def internal(name: str, known: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (or None for a name outside the project, or a package symbol)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def violations() -> list[str]:
    known = modules()
    out = []
    for module, path in known.items():
        if module == "edge_qmul":  # the facade
            continue
        src = layer(module)
        for name, line in imports(path, module):
            target = internal(name, known)
            if target is None or target == module or target == "edge_qmul":
                continue
            dst = layer(target)
            if RANK[dst] > RANK[src]:
                out.append(f"{path.relative_to(ROOT)}:{line}: {module} ({src}) imports {target} ({dst})")
    return out


def test_layers_import_only_downwards() -> None:
    assert violations() == []


def test_the_on_board_runtime_imports_only_stdlib_numpy_and_onnxruntime() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for module in ("edge_qmul.devices.runtime", "edge_qmul.devices.ed25519"):
        path = modules()[module]
        bad = [(name, line) for name, line in imports(path, module)
               if name.split(".")[0] not in stdlib and name.split(".")[0] not in RUNTIME_ALLOWED
               and name not in RUNTIME_ALLOWED and not name.startswith("edge_qmul.devices.ed25519")
               and name != "edge_qmul.devices"]
        assert bad == [], f"{path} imports {bad}"


@pytest.mark.parametrize(("source", "expected"), [
    ("from edge_qmul.federated import rollout\n", "imports edge_qmul.federated"),
    ("def f():\n    from edge_qmul.cli import main\n", "imports edge_qmul.cli"),
])
def test_the_check_sees_module_level_and_lazy_upward_imports(tmp_path: Path, source: str, expected: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "export"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text(source)
    patched = {**PACKAGES, "edge_qmul.export": fake}
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", patched)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path.parent)
    found = [v for v in violations() if "edge_qmul.export.bad" in v]
    assert found and expected in found[0]


def test_each_run_artifact_file_name_is_spelled_once_in_the_package() -> None:
    from edge_qmul.run import ARTIFACTS

    sources = {p: p.read_text(encoding="utf-8") for p in modules().values()}
    for artifact in ARTIFACTS.values():
        if artifact.format == "dir" or "{" in artifact.name:
            continue
        where = [str(p.relative_to(ROOT)) for p, text in sources.items()
                 for _ in range(text.count(f'"{artifact.name}"'))]
        # the on-board runtime names the same files inside a bundle: the board's own format, not the run's
        where = [w for w in where if w != "devices/runtime.py"]
        assert where == ["edge_qmul/run.py"], f"{artifact.name} is spelled in {where}"
