"""The package as a user installs it: one top-level package, the cohort workflows inside it, configs as package data.

The repository keeps its cohort workflows in the top-level folder pipelines/; they install as hagan_clinic.pipelines.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_installed_and_pipelines_lands_inside_the_package():
    setup = _pyproject()["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hagan_clinic").rglob("__init__.py")} | {
        "hagan_clinic.pipelines"
    }
    assert sorted(setup["packages"]) == sorted(found)
    assert setup["package-dir"] == {"hagan_clinic.pipelines": "pipelines"}
    assert (ROOT / "pipelines" / "__init__.py").is_file()  # the repository keeps its top-level folder
    assert not (ROOT / "hagan_clinic" / "pipelines").exists()  # one layout, not two


@pytest.mark.slow
def test_no_module_imports_a_top_level_pipelines_package():
    """Code names the workflows hagan_clinic.pipelines (or relatively): a bare ``pipelines`` would be whatever a
    user's folder or another distribution of that name holds."""
    bad = []
    for path in [*(ROOT / "hagan_clinic").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py"), *ROOT.glob("*/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "pipelines" or n.startswith("pipelines.")]
    assert bad == []


def test_shipped_configs_are_package_data_and_load_by_name_from_any_folder(tmp_path):
    data = _pyproject()["tool"]["setuptools"]["package-data"]["hagan_clinic"]
    assert "configs/*.yaml" in data
    shipped = sorted(p.stem for p in (ROOT / "hagan_clinic" / "configs").glob("*.yaml"))
    assert {"base", "tiny", "demo", "paper_128", "paper_256"} <= set(shipped)
    code = (
        "from hagan_clinic.config import load_config\n"
        f"for name in {shipped!r}:\n"
        "    print(name, load_config(name).model.size)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == shipped


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package_with_its_workflows_and_configs(tmp_path):
    """Builds the wheel (without build isolation: no download) from a copy of the sources, so that no earlier build
    folder can leak files into it, and reads its file list."""
    src = tmp_path / "src"
    for name in ("hagan_clinic", "pipelines"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("hagan_clinic-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"hagan_clinic"}
    for module in ("pipelines/encode.py", "pipelines/demo.py", "cli/__init__.py", "configs/tiny.yaml", "py.typed"):
        assert f"hagan_clinic/{module}" in names
    sources = {n.removeprefix("hagan_clinic/") for n in names if n.endswith(".py")}
    in_repo = {str(p.relative_to(ROOT / "hagan_clinic")) for p in (ROOT / "hagan_clinic").rglob("*.py")}
    in_repo |= {f"pipelines/{p.name}" for p in (ROOT / "pipelines").glob("*.py")}
    assert sources == in_repo


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Repository layout", 1)[1]
    return section.split("```", 2)[1]


def test_the_readme_layout_names_every_module_and_only_modules_that_exist():
    block = _layout_block()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", block))
    modules = [
        p
        for folder in ("hagan_clinic", "pipelines")
        for p in (ROOT / folder).rglob("*.py")
        if p.stem not in ("__init__", "__main__")
    ]
    assert sorted(str(p.relative_to(ROOT)) for p in modules if p.stem not in words) == []
    named = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\.py\b", block))
    stems = {p.stem for p in modules} | {"__init__", "conftest"}
    assert sorted(named - stems) == []
    folders = set(re.findall(r"(?<![\w.])([A-Za-z_][A-Za-z0-9_]*)/", block))
    present = {
        p.name for base in (ROOT, ROOT / "hagan_clinic", ROOT / "benchmarks") for p in base.iterdir() if p.is_dir()
    }
    assert sorted(folders - present) == []


def test_a_checkout_on_the_path_runs_its_own_workflows(tmp_path):
    """The editable install maps hagan_clinic.pipelines to the installed checkout's folder; another checkout put on
    PYTHONPATH (a worktree, a copy) must not silently run the installed checkout's workflows."""
    copy = tmp_path / "checkout"
    for name in ("hagan_clinic", "pipelines", "tests"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    code = (
        "import hagan_clinic, hagan_clinic.pipelines.encode as e, importlib.util\n"
        "print(hagan_clinic.__file__); print(e.__file__); print(len(hagan_clinic.__path__))\n"
        "print(importlib.util.find_spec('hagan_clinic.tests') is None)"
    )
    env = {**os.environ, "PYTHONPATH": str(copy)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    package, workflow, paths, no_tests = done.stdout.split()
    assert Path(package).is_relative_to(copy) and Path(workflow) == copy / "pipelines" / "encode.py"
    assert (paths, no_tests) == ("1", "True")  # the package is its own folder, not the whole repository


#: Read by a library, not imported: pyarrow (pandas' parquet), the pylibjpeg decoders (pydicom), psutil (MLflow's
#: system metrics of train, encode and augment).
USED_INDIRECTLY = {"pyarrow", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "psutil"}


def _imported_modules() -> set[str]:
    names = set()
    for path in [*(ROOT / "hagan_clinic").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"hagan_clinic"}


def test_the_dependencies_are_what_the_code_imports():
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    declared = {
        re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()
        for requirement in _pyproject()["project"]["dependencies"]
    }
    undeclared, used = [], set()
    for module in sorted(_imported_modules()):
        found = {d.lower() for d in owners.get(module, [])} & declared
        used |= found
        if not found:
            undeclared.append(module)
    assert undeclared == []  # an import that a fresh install would not have
    assert sorted(declared - used - USED_INDIRECTLY) == []  # a dependency nothing uses
