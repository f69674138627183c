"""The project as a wheel (a non-editable install) carries every module of both floors.

Editable installs and the tests' own checkout import from the source tree, so a package
missing from the build configuration shows only to a user who installs a wheel: the
app then fails at import (engine_runtime.group and deployments.protocol were missing).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_every_module_of_both_floors(tmp_path: Path) -> None:
    # Built from a copy: setuptools builds in place through build/, whose files from an
    # earlier build would end up in the wheel and hide a missing package.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for floor in ("engine_runtime", "deployments"):
        shutil.copytree(ROOT / floor, src / floor, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("ebb-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packed = set(zf.namelist())
    sources = {p.relative_to(ROOT).as_posix() for floor in ("engine_runtime", "deployments")
               for p in (ROOT / floor).rglob("*") if p.suffix in (".py", ".c") and "__pycache__" not in p.parts}
    missing = sorted(sources - packed)
    assert not missing, f"{len(missing)} source files are not in {wheel.name}: {missing}"
