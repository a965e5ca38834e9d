"""Packaging: no folder of the checkout hides an installed distribution, and a built wheel works on its own."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Folders that Python puts first on sys.path when tierkv's own commands run from the checkout: the repository root
# (the current directory of `python -m pytest`, `python -c`, a script at the root), tests/ (pytest's rootdir
# conftest) and the script folders.
LAUNCH_DIRS = [REPO, REPO / "tests", REPO / "benchmarks", REPO / "scripts"]

_WHERE = """
import importlib.util, json, sys
found = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    found[name] = [spec.origin or ""] + list(spec.submodule_search_locations or []) if spec else []
print(json.dumps(found))
"""


def _where(names: list[str], cwd: Path) -> dict[str, list[str]]:
    """Where each top-level module name resolves from `cwd`, as `python -c` launched there sees it (nothing imported)."""
    out = subprocess.run([sys.executable, "-c", _WHERE, *names], cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_no_folder_of_the_checkout_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    own = {name for name, dists in installed.items() if "tierkv" in dists}
    assert "kernels" in installed, "transformers' dependency on Hugging Face's kernels is what this test guards"
    for folder in LAUNCH_DIRS:
        entries = {p.stem if p.suffix == ".py" else p.name for p in folder.iterdir()}
        names = sorted((entries & set(installed)) - own)
        for name, locations in _where(names, folder).items():
            mine = (folder / name, folder / f"{name}.py")
            inside = [
                loc for loc in locations if loc and any(Path(loc).resolve().is_relative_to(m.resolve()) for m in mine)
            ]
            assert not inside, (
                f"`import {name}` run from {folder} finds the checkout's {inside} instead of the installed "
                f"distribution {installed[name]}: a folder with an __init__.py (or a module) of that name there "
                "shadows it; keep such folders free of __init__.py (see pyproject.toml, [tool.setuptools])"
            )


def test_transformers_and_tierkv_kernels_import_from_the_repository_root():
    code = (
        "import kernels, transformers.integrations.hub_kernels; from transformers import LlamaConfig; "
        "import tierkv.kernels.paged_attention, tierkv.policies.registry; print(kernels.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).resolve().is_relative_to(REPO / "kernels"), out.stdout


@pytest.mark.slow
def test_the_built_wheel_runs_outside_the_checkout(tmp_path):
    constraints = os.environ.get("TIERKV_CONSTRAINTS", REPO / "constraints.txt")  # scripts/lock.sh tests a new set
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Built from a copy of the sources: setuptools builds in the source tree's build/, whose leftovers (a module
    # deleted since) would otherwise land in the wheel.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "out",
            "bench-out",
            ".whl",
            ".peers",
            ".*cache",
            ".hypothesis",
            ".tierkv-nvme",
            "__pycache__",
        ),
    )
    subprocess.run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "--build-constraint",
            str(constraints),
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("tierkv-*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "tierkv"
    shipped = {  # every module and data file of the package as the checkout has it (through its links)
        str(Path(folder, name).relative_to(REPO))
        for folder, _, names in os.walk(package, followlinks=True)
        for name in names
        if name.endswith((".py", ".yaml", ".jsonl", ".json")) and "__pycache__" not in folder
    }
    assert "tierkv/kernels/paged_attention.py" in shipped and "tierkv/configs/models/tiny-llama.json" in shipped
    missing = sorted(shipped - files)
    assert not missing, f"the wheel lacks {missing} (list new packages in pyproject.toml's [tool.setuptools] packages)"
    assert not any(f.split("/")[0] in ("kernels", "policies", "configs", "tests") for f in files), (
        "top-level folders leaked"
    )

    # A fresh environment holding only the wheel's tierkv. Its dependencies are this environment's, visible through
    # a .pth line (which adds the folder to sys.path without running the editable install's hooks inside it), so
    # that pip checks the wheel's requirements against the tested set instead of downloading them again.
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    site = subprocess.run(
        [env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    here = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "tested-dependencies.pth").write_text("\n".join(here) + "\n")
    subprocess.run(
        [
            *pip,
            "--python",
            str(env / "bin" / "python"),
            "install",
            "-q",
            "--no-index",
            f"tierkv[demo] @ {wheel.as_uri()}",
        ],
        check=True,
        capture_output=True,
    )

    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str) -> str:
        out = subprocess.run([str(env / "bin" / args[0]), *args[1:]], cwd=work, capture_output=True, text=True)
        assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    assert run("python", "-c", "import tierkv; print(tierkv.__file__)").startswith(site)
    assert run("tierkv", "--version").startswith("tierkv ")
    assert run("python", "-m", "tierkv", "--version") == run("tierkv", "--version")
    assert "--workload" in run("tierkv", "bench", "--help")
    assert ": ok, 6 records" in run("tierkv", "run", "--check")
    # The default bench reads its preset model config from the package data.
    run("tierkv", "bench", "--num-requests", "2", "--output-len", "2", "--gpu-blocks", "8", "--no-plots", "--out", "b")
    assert json.loads((work / "b" / "results.json").read_text())["runs"][0]["requests"] == 2
