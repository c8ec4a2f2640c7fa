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


def test_publish_workflow_is_gated_to_main_and_never_runs_for_pull_requests():
    """Secrets and the signing identity only where no PR code runs: pushes to main, the nightly run and manual
    dispatch, in this repository (or a fork that opts in); the mirror copies what the publish job pushed."""
    import yaml

    workflow = yaml.safe_load((REPO_ROOT / ".github/workflows/publish.yml").read_text(encoding="utf-8"))
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert set(triggers) == {"push", "schedule", "workflow_dispatch"}
    assert triggers["push"] == {"branches": ["main"]}
    assert workflow["permissions"] == {"contents": "read"}
    jobs = workflow["jobs"]
    assert set(jobs) == {"stacks", "publish", "mirror"}
    for name, job in jobs.items():
        gate = job["if"]
        assert "github.ref == 'refs/heads/main'" in gate and "github.event_name" in gate, name
        assert "github.repository ==" in gate and "pull_request" not in gate, name
        assert job["environment"] == "publish", name  # the secrets live in an environment limited to main
        writes_id = job.get("permissions", {}).get("id-token") == "write"
        assert writes_id == (name == "publish"), name  # only the signing job gets an OIDC token
    assert jobs["publish"]["needs"] == "stacks" and jobs["mirror"]["needs"] == "publish"
    text = (REPO_ROOT / ".github/workflows/publish.yml").read_text(encoding="utf-8")
    assert "pull_request" not in text.split("jobs:")[0] and "pull_request_target" not in text
    steps = " ".join(str(s.get("run", "")) for s in jobs["publish"]["steps"])
    assert "cosign sign" in steps and "cosign attest" in steps and "cyclonedx" in steps and "make publish" in steps
