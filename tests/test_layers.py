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


def imports(path: Path, module: str, *, on_import: bool = False) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute names), with its line; with ``on_import``, only those that run when
    the module is imported (top-level statements, without ``TYPE_CHECKING`` blocks and function bodies)."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in _top_level(tree.body) if on_import else ast.walk(tree):
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


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    out = []
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out += _top_level(node.orelse)
        elif isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level([*node.body, *node.orelse, *node.finalbody, *(s for h in node.handlers for s in h.body)])
        else:
            out.append(node)
    return out


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



def device_violations() -> tuple[list[str], set[str]]:
    """What devices/state.py (all its imports, lazy ones included) and the project modules it reaches (their imports
    at import time) import beyond the standard library, numpy, cryptography and the lean layers; and what it reaches."""
    known = modules()
    allowed = set(sys.stdlib_module_names) | {"__future__", "numpy", "cryptography", "edge_qmul"}
    seen: set[str] = set()
    todo, bad = ["edge_qmul.devices.state"], []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if layer(module) in ("edge_qmul.export", "edge_qmul.federated", "top"):
            bad.append(f"{module} is reached")
        for name, line in imports(known[module], module, on_import=module != "edge_qmul.devices.state"):
            target = internal(name, known)
            if target is not None:
                todo.append(target)
            elif name.split(".")[0] not in allowed:
                bad.append(f"{module}:{line} imports {name}")
    return bad, seen


def test_the_device_state_imports_only_stdlib_numpy_and_cryptography() -> None:
    """`edge-qmul device` runs on an install without torch (pyproject's device extra), so nothing it reaches imports
    torch, export/ or federated/. tests/test_device_state.py also runs the verbs with torch unimportable."""
    bad, seen = device_violations()
    assert bad == []
    assert {"edge_qmul.content", "edge_qmul.data", "edge_qmul.ledger"} <= seen  # the walk follows the imports


@pytest.mark.parametrize(("source", "expected"), [
    ("def f():\n    import torch\n", "imports torch"),  # state.py's own lazy imports count
    ("from edge_qmul.devices import helper\n", "imports sklearn"),  # and what a reached module imports on import
    ("from edge_qmul.federated import rollout\n", "edge_qmul.federated.rollout is reached"),
])
def test_the_device_check_sees_heavy_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                                            expected: str) -> None:
    fake = tmp_path / "devices"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "state.py").write_text(source)
    (fake / "helper.py").write_text("import sklearn\n\ndef lazy():\n    import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", {**PACKAGES, "edge_qmul.devices": fake})
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path.parent)
    bad, _ = device_violations()
    assert any(expected in b for b in bad), bad
    assert not any("helper:4 imports torch" in b for b in bad)  # a reached module's lazy import runs only if called
