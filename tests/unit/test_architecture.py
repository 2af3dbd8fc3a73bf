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
