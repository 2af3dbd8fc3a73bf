"""The rules of the tree (README, Development): what may import what."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[2]
TOOLING = ("tunebus.shared.cli", "tunebus.shared.devstack", "tunebus.shared.dashboard")


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def test_the_runtime_imports_no_tooling_and_no_service():
    runtime = [p for p in python_files("shared") if p.parent == ROOT / "shared"]
    assert runtime
    for path in runtime:
        wrong = {n for n in imports(path) if n.startswith((*TOOLING, "tunebus.services"))}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_services_import_no_tooling_and_no_other_service():
    for path in python_files("services"):
        service = path.relative_to(ROOT / "services").parts[0]
        for name in imports(path):
            assert not name.startswith(TOOLING), f"{path.relative_to(ROOT)} imports {name}"
            if name.startswith("tunebus.services."):
                assert name.split(".")[2] == service, f"{path.relative_to(ROOT)} imports {name}"


def test_only_the_object_store_touches_minio():
    for path in python_files("shared", "services", "contracts"):
        if path == ROOT / "shared" / "objectstore.py":
            continue
        minio = {n for n in imports(path) if n.split(".")[0] == "minio"}
        assert not minio, f"{path.relative_to(ROOT)} imports {sorted(minio)}"
        assert ".client." not in path.read_text().replace("self.client.", ""), (
            f"{path.relative_to(ROOT)} reaches through the object store's client")


def test_only_the_backends_table_names_a_trainer_backend_module():
    trainer = ROOT / "services" / "trainer"
    for path in sorted(trainer.glob("*.py")):
        text = path.read_text()
        for module in ("mlx_backend", "torch_backend", "mlx_methods", "torch_methods"):
            assert module not in text, f"{path.relative_to(ROOT)} names {module}"


def _string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_only_the_backends_tables_their_packages_contracts_and_settings_name_a_backend():
    """A backend's name ("mlx", "cuda") is said by the trainer's and the evaluator's BACKENDS
    tables, by the backend's own package (its name, its capabilities), by the settings and by the
    contracts; everything else takes it from there. "mlx" is also an adapter layout, named in
    shared/adapter_layouts.py and taken from there everywhere else."""
    from tunebus.services.evaluator.backend import BACKENDS as EVALUATORS
    from tunebus.services.trainer.backends import BACKENDS as TRAINERS

    assert set(EVALUATORS) == set(TRAINERS)  # one name per backend, in both services
    trainer_backends = ROOT / "services" / "trainer" / "backends"
    evaluator = ROOT / "services" / "evaluator"
    allowed = {trainer_backends / "__init__.py", evaluator / "backend.py",
               ROOT / "shared" / "settings.py", ROOT / "shared" / "adapter_layouts.py"}
    allowed |= {evaluator / f"{module}.py" for _, module in EVALUATORS.values()}
    allowed |= {p for b in TRAINERS.values() for p in (trainer_backends / b.package).rglob("*.py")}
    runtime = [p for p in python_files("shared") if p.parent == ROOT / "shared"]
    for path in [*python_files("services"), *runtime]:
        if path not in allowed:
            named = _string_literals(path) & set(TRAINERS)
            assert not named, f"{path.relative_to(ROOT)} names the backend {sorted(named)}"


def test_no_test_module_imports_another_and_helpers_live_in_tests_helpers():
    tests = ROOT / "tests"
    for path in python_files("tests"):
        for name in imports(path):
            assert not name.startswith(("tests.unit", "tests.integration", "tests.faults",
                                        "tests.cluster", "tests.conftest")), (
                f"{path.relative_to(ROOT)} imports {name}: shared helpers go in tests/helpers/")
        relative = {node.module for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.level and node.module
                    and node.module.startswith(("test_", "conftest"))}
        assert not relative, f"{path.relative_to(tests)} imports {sorted(relative)} from a test module"


def test_one_adapter_layout_module():
    """Layout names, file names and conversion: shared/adapter_layouts.py, nothing beside it."""
    assert not (ROOT / "shared" / "adapter_formats.py").exists()
    for path in [*python_files("services", "shared", "tests"), *python_files("benchmarks")]:
        assert "adapter_formats" not in imports(path) and not any(
            n.endswith(".adapter_formats") for n in imports(path)), path
