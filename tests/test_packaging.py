"""A non-editable install (pip install . / a wheel) carries every runtime package and its data."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNTIME = REPO / "runtime" / "selfllm_runtime"


def test_the_wheel_carries_every_runtime_package_and_the_lora_default_data(tmp_path: Path):
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info behind
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "selfllm_recipes", source / "selfllm_recipes", ignore=ignore)
    shutil.copytree(REPO / "runtime", source / "runtime", ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True)
    wheel, = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = sorted(p.parent.relative_to(RUNTIME.parent).as_posix() for p in RUNTIME.rglob("__init__.py")
                      if "__pycache__" not in p.parts)
    missing = [package for package in packages if f"{package}/__init__.py" not in names]
    assert not missing, f"packages left out of the wheel (pyproject.toml [tool.setuptools] packages): {missing}"
    assert "selfllm_runtime/finetune/data/huanhuan.json" in names
