"""The layers point one way (docs/design/README.md), and the distribution installs one package.

storage <- worker.engine <- worker.runtime <- coordinator.jobs <- coordinator.cli, coordinator.local

A module may import its own layer and those below it, never one above; the engine imports no
Celery, Redis or boto3; no production module imports the tests or the benchmarks (test-only
code such as fault injection reaches the workers as a plugin: ``tests/faultplugin.py``).
Function-level imports count as much as top-level ones.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("storage", "worker", "coordinator")
LAYERS = [
    ("compactor.storage",),
    ("compactor.worker.engine",),
    ("compactor.worker.runtime",),
    ("compactor.coordinator.jobs",),
    ("compactor.coordinator.cli", "compactor.coordinator.local"),
]
ENGINE_FORBIDDEN = ("celery", "kombu", "redis", "boto3", "botocore")
NOT_PRODUCTION = ("tests", "bench")


def layer_of(module: str) -> int | None:
    for level, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def modules(root: Path) -> dict[str, Path]:
    """Every module of the ``compactor`` package under ``root`` by its dotted name."""
    out = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(("compactor", *parts)).removesuffix(".__init__")
            out[name] = path
    return out


def imported(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            # ``from compactor.worker import runtime`` imports the sub-package itself.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    out = []
    for name, path in modules(root).items():
        level = layer_of(name)
        if level is None:
            continue  # the folders' own __init__ modules hold docstrings only
        reported: set[int] = set()
        for line, target in imported(path):
            if line in reported:
                continue
            where = f"{path.relative_to(root)}:{line}"
            before = len(out)
            target_level = layer_of(target)
            if target_level is not None and target_level > level:
                out.append(f"{where}: {name} (layer {level}) imports {target} (layer {target_level})")
            if level <= 1 and target.split(".")[0] in ENGINE_FORBIDDEN and name.startswith("compactor.worker"):
                out.append(f"{where}: the engine imports {target}")
            if target.split(".")[0] in NOT_PRODUCTION:
                out.append(f"{where}: production module {name} imports {target}")
            if len(out) > before:
                reported.add(line)  # one report per import statement
    return out


def test_imports_point_down_the_layers() -> None:
    problems = violations(ROOT)
    assert not problems, "imports pointing up the layers:\n" + "\n".join(problems)


def test_every_module_belongs_to_a_layer_and_is_packaged() -> None:
    import tomllib

    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = modules(ROOT)
    unplaced = [
        name for name in found if layer_of(name) is None and name not in {"compactor.worker", "compactor.coordinator"}
    ]
    assert not unplaced, unplaced
    folders = {name for name, path in found.items() if path.name == "__init__.py"}
    assert folders == packages, f"pyproject.toml's packages and the folders differ: {folders ^ packages}"


def test_a_planted_upward_import_is_found(tmp_path: Path) -> None:
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(tmp_path) == []
    planted = tmp_path / "worker" / "engine" / "plan.py"
    planted.write_text(planted.read_text() + "\n\ndef _up() -> None:\n    from compactor.worker.runtime import tasks\n")
    (tmp_path / "storage" / "keys.py").write_text(
        (tmp_path / "storage" / "keys.py").read_text() + "\nfrom compactor.coordinator.jobs import split\n"
    )
    tasks = tmp_path / "worker" / "runtime" / "tasks.py"
    tasks.write_text(tasks.read_text() + "\nfrom tests.faultplugin import set_fault\n")
    found = violations(tmp_path)
    assert len(found) == 3, found
    assert "compactor.worker.engine.plan (layer 1) imports compactor.worker.runtime" in "".join(found)
    assert "production module compactor.worker.runtime.tasks imports tests.faultplugin" in "".join(found)


@pytest.mark.slow
def test_the_distribution_installs_only_compactor(tmp_path: Path) -> None:
    # From a copy: building in the checkout would leave build/ behind.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top == ["compactor"], top
    installed = {p.name for p in (target / "compactor").iterdir()}
    assert installed == set(FOLDERS), installed


def test_flower_loads_the_app_without_the_engine() -> None:
    """``celery -A compactor.worker.runtime.app flower`` imports the app alone: no pyarrow, no
    engine run, no meta-job flow."""
    code = (
        "import sys, compactor.worker.runtime.app; "
        "print(sorted(m for m in ('pyarrow', 'compactor.worker.engine.run', 'compactor.coordinator.jobs') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
