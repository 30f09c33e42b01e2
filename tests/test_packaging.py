"""The wheel holds every file of the package: `make test` runs on an editable install, where a
file that package-data forgets is still found, so only a built wheel shows it missing."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.orig", "*.rej")


def _package_files(package: Path) -> set[str]:
    return {p.relative_to(package.parent).as_posix() for p in package.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_wheel_holds_every_package_file_and_nothing_else(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    # Built from a copy: a build in the checkout would leave build/ and *.egg-info there (and reuse
    # a stale build/lib).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=IGNORE)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("geobind-*.whl")
    names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("geobind-")}
    here = _package_files(src / "src" / "geobind")
    assert not here - names, f"package files missing from the wheel (package-data): {sorted(here - names)}"
    assert not names - here, f"files in the wheel that the package lacks: {sorted(names - here)}"
