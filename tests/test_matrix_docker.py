"""Docker integration: the matrix builder builds qwen3/fastapi, starts it, calls its API; broken
recipes fail clearly while the good one passes; reruns reuse; Ctrl-C leaves no container behind.

These are real builds on the local engine (a cold machine builds the ~6 GB torch stack once)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfllm_recipes.layout import REPO_ROOT
from selfllm_recipes.smoke.runner import SMOKE_LABEL, owner_label, publish_on_loopback

pytestmark = pytest.mark.docker
MATRIX = [sys.executable, str(REPO_ROOT / "scripts" / "build_matrix.py")]


def run_matrix(*args: str, recipes: Path | None = None, timeout: int = 3000) -> subprocess.CompletedProcess:
    env = {**os.environ, "TESTCONTAINERS_RYUK_DISABLED": "true"}
    if recipes is not None:
        env["SELFLLM_RECIPES_DIR"] = str(recipes)
    return subprocess.run([*MATRIX, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def smoke_containers(client, owner: int | None = None) -> set[str]:
    """Ids of smoke-test containers (of one run's pid, when given); other runs may share the engine."""
    label = SMOKE_LABEL if owner is None else f"{SMOKE_LABEL}={owner}"
    return {c.id for c in client.containers.list(all=True, filters={"label": label})}


@pytest.fixture(scope="module")
def recipes_with_broken(tmp_path_factory) -> Path:
    """The real qwen3/fastapi plus two broken recipes: bad YAML (qwen3/badyaml), and a family whose
    fastapi recipe pins its own dependencies with an unpinned requirement (unpinned/fastapi)."""
    from selfllm_recipes.generate import expected_files, write_generated
    from selfllm_recipes.layout import TASKS_DIR
    from selfllm_runtime.metadata import load_family, load_recipe

    root = tmp_path_factory.mktemp("tree") / "recipes"
    (root / "qwen3").mkdir(parents=True)
    for name in ("model.yaml", "chat_template.jinja"):
        shutil.copy(REPO_ROOT / "recipes/qwen3" / name, root / "qwen3" / name)
    shutil.copytree(REPO_ROOT / "recipes/qwen3/fastapi", root / "qwen3/fastapi")
    bad_yaml = root / "qwen3/badyaml"
    shutil.copytree(REPO_ROOT / "recipes/qwen3/fastapi", bad_yaml)
    (bad_yaml / "recipe.yaml").write_text("name: broken\ntask: [fastapi\n")
    unpinned = root / "unpinned/fastapi"
    shutil.copytree(root / "qwen3", root / "unpinned", ignore=shutil.ignore_patterns("badyaml"))
    (unpinned / "recipe.yaml").write_text("model: unpinned\ntask: fastapi\n")
    shutil.copy(TASKS_DIR / "fastapi/requirements.in", unpinned / "requirements.in")  # its own lock
    recipe = load_recipe(unpinned, root, TASKS_DIR)
    write_generated(unpinned, expected_files(unpinned, recipe, load_family(root / "unpinned"), root / "unpinned", TASKS_DIR))
    lock = unpinned / "requirements.lock"
    lock.write_text("requests>=2 \\\n    --hash=sha256:0000\n" + lock.read_text())
    return root


def test_matrix_builds_and_smoke_tests_with_broken_recipes_beside(docker_client, recipes_with_broken, tmp_path):
    before = smoke_containers(docker_client)
    result = run_matrix("--report-dir", str(tmp_path), recipes=recipes_with_broken)
    assert result.returncode == 1, result.stdout + result.stderr  # broken recipes make the run fail...
    report = {row["recipe"]: row for row in json.loads((tmp_path / "report.json").read_text())}
    assert report["qwen3/fastapi"]["status"] == "pass", report["qwen3/fastapi"]  # ...but not the good one
    assert report["qwen3/badyaml"]["status"] == "fail"
    assert "badyaml/recipe.yaml: line 2: invalid YAML" in report["qwen3/badyaml"]["error"]
    assert "unpinned/fastapi/requirements.lock: line 1: 'requests>=2' is not pinned" in report["unpinned/fastapi"]["error"]
    for name in ("report.md", "junit.xml"):
        assert (tmp_path / name).is_file()
    image = docker_client.images.get("selfllm/qwen3-fastapi:latest")
    labels = image.labels
    assert labels["org.selfllm.recipe"] == "qwen3/fastapi"
    assert "transformers==" in labels["org.selfllm.pip-freeze"]
    assert {"org.opencontainers.image.source", "org.opencontainers.image.revision",
            "org.opencontainers.image.created"} <= labels.keys()
    assert smoke_containers(docker_client) <= before  # the run removed its own container


def test_rerun_with_nothing_changed_reuses_image_and_smoke_result(docker_client, tmp_path):
    first = run_matrix("--only", "qwen3/fastapi", "--report-dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stdout + first.stderr
    started = time.monotonic()
    second = run_matrix("--only", "qwen3/fastapi", "--report-dir", str(tmp_path / "b"))
    elapsed = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr
    (row,) = json.loads((tmp_path / "b/report.json").read_text())
    assert row["status"] == "pass" and row["build"] == "reused" and row["smoke"].startswith("reused")
    print(f"no-change rerun took {elapsed:.1f} s")


def test_api_of_the_built_image_over_http(docker_client):
    """Start the image the way a user does (plus the tiny model) and call the API on 127.0.0.1."""
    import requests
    from testcontainers.core.container import DockerContainer

    from selfllm_recipes.smoke.checks import SMOKE_MODEL_DIR, wait_until_healthy
    from selfllm_recipes.smoke.runner import session_of

    container = (DockerContainer("selfllm/qwen3-fastapi:latest")
                 .with_env("MODEL_PATH", SMOKE_MODEL_DIR)
                 .with_kwargs(entrypoint=["/bin/sh", "-c"], labels=owner_label())
                 .with_command([f"selfllm smoke-model {SMOKE_MODEL_DIR} && exec selfllm start"]))
    publish_on_loopback(container, 6006)
    try:
        container.start()
        url = f"http://127.0.0.1:{container.get_exposed_port(6006)}"
        wait_until_healthy(session_of(container, url, "qwen3/fastapi"), "/health", 300)
        answer = requests.post(url + "/", json={"prompt": "你好", "history": [], "max_length": 16}, timeout=60)
        assert answer.status_code == 200
        assert answer.json()["response"].strip()
        health = container.get_wrapped_container()
        health.reload()
        assert health.attrs["Config"]["Healthcheck"]["Test"][-2:] == ["selfllm", "health"]
    finally:
        container.stop()
    assert not smoke_containers(docker_client, os.getpid())


def forget_smoke_results(key: str = "qwen3/fastapi") -> None:
    """Force a real smoke run of this recipe (the other recipes' results stay)."""
    for cached in (REPO_ROOT / ".selfllm-cache" / "smoke").glob(key.replace("/", "-") + "-*.json"):
        cached.unlink()


def qwen3_fastapi_tree(root: Path) -> Path:
    """recipes/qwen3/fastapi alone, plus a file unique to this call: its image is never reused."""
    (root / "qwen3").mkdir(parents=True)
    for name in ("model.yaml", "chat_template.jinja"):
        shutil.copy(REPO_ROOT / "recipes/qwen3" / name, root / "qwen3" / name)
    shutil.copytree(REPO_ROOT / "recipes/qwen3/fastapi", root / "qwen3/fastapi")
    (root / "qwen3/fastapi/ctrl-c-test.txt").write_text(f"{time.time_ns()}\n")
    return root


def build_containers(client, since: float) -> list[str]:
    """Containers made since `since` from the qwen3/fastapi build chain (the legacy builder's step
    containers, the pip freeze container)."""
    stack = "selfllm/stack:torch2.6.0-cu12"
    return [c.short_id for c in client.containers.list(all=True, filters={"ancestor": stack})
            if c.attrs["Created"] and _created(c) >= since]


def _created(container) -> float:
    from datetime import datetime

    stamp = container.attrs["Created"].split(".")[0].rstrip("Z")
    return datetime.fromisoformat(stamp + "+00:00").timestamp()


# Each phase's marker line (the builder logs `phase: <phase> <recipe>` as it enters one): SIGINT is
# sent once the line is out, so it lands in that phase, not at a time that depends on the machine.
PHASES = ["container start", "health wait", "check", "build"]


@pytest.mark.parametrize("phase", PHASES)
def test_ctrl_c_in_every_phase_exits_130_and_leaves_no_container(docker_client, tmp_path, phase):
    env = {**os.environ, "TESTCONTAINERS_RYUK_DISABLED": "true"}
    if phase == "build":
        env["SELFLLM_RECIPES_DIR"] = str(qwen3_fastapi_tree(tmp_path / "recipes"))
    forget_smoke_results()
    since = time.time() - 1
    proc = subprocess.Popen([*MATRIX, "--only", "qwen3/fastapi", "--report-dir", str(tmp_path / "report")],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker, seen = f"phase: {phase} qwen3/fastapi", []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                proc.send_signal(signal.SIGINT)
                break
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen) + output
    assert marker in output, output
    assert proc.returncode == 130, output
    assert "interrupted: removing" in output
    assert not smoke_containers(docker_client, proc.pid)
    deadline = time.monotonic() + 30  # the engine cancels a build whose client went away, then removes its step container
    while build_containers(docker_client, since):
        assert time.monotonic() < deadline, f"build containers left: {build_containers(docker_client, since)}"
        time.sleep(1)


def test_a_swallowed_ctrl_c_still_stops_the_matrix(docker_client, tmp_path, monkeypatch):
    """Code that catches the KeyboardInterrupt of a Ctrl-C (here: the check itself; in the wild a
    finalizer, where Python drops it) cannot make the run go on and report a pass."""
    from selfllm_recipes import cli
    from selfllm_recipes.smoke import runner
    from selfllm_recipes.smoke.checks import SmokeCheck

    def swallowing_verify(session) -> str:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass
        return "passed"

    monkeypatch.setattr(runner, "check_for", lambda task: SmokeCheck(command="sleep 60", verify=swallowing_verify,
                                                                      serves_http=False))
    monkeypatch.setattr(runner, "wait_until_exited", lambda session, timeout_s: 0)
    forget_smoke_results()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["--only", "qwen3/fastapi", "--report-dir", str(tmp_path)])
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert code == 130
    assert not smoke_containers(docker_client, os.getpid())


def test_an_unexpected_error_in_a_check_is_that_recipe_s_fail(docker_client, tmp_path, monkeypatch):
    """A check that raises something other than SmokeFailure must not crash the matrix."""
    from selfllm_recipes.discover import load_spec
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_recipes.smoke import runner
    from selfllm_recipes.smoke.checks import SmokeCheck

    def broken_verify(session):
        raise ConnectionError("client blew up")

    check = SmokeCheck(command="true", verify=broken_verify, serves_http=False)
    monkeypatch.setattr(runner, "check_for", lambda task: check)
    before = smoke_containers(docker_client)
    result = runner.run_smoke(load_spec(RECIPES_DIR / "qwen3/fastapi"), "selfllm/qwen3-fastapi:latest", False, tmp_path)
    assert not result.ok and result.detail.startswith("ConnectionError: client blew up")
    assert smoke_containers(docker_client) <= before
