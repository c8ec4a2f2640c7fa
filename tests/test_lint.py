"""actionlint over the workflows and hadolint over every Dockerfile."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from selfllm_recipes.layout import REPO_ROOT


def tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    assert Path(found).exists(), f"{name} not installed (pip install -e .[test])"
    return found


def test_actionlint_workflows():
    workflows = sorted(str(p) for p in (REPO_ROOT / ".github/workflows").glob("*.yml"))
    assert workflows
    result = subprocess.run([tool("actionlint"), *workflows], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_dockerfiles():
    dockerfiles = sorted(str(p) for p in REPO_ROOT.glob("**/Dockerfile") if ".venv" not in p.parts)
    assert len(dockerfiles) >= 4
    result = subprocess.run([tool("hadolint"), *dockerfiles], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
