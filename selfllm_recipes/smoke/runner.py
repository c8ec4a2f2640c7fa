"""Run one recipe image in a container through testcontainers and apply its task's check.

The container is always removed: on success, failure, timeout and Ctrl-C (SIGINT/SIGTERM).
Published ports bind to 127.0.0.1 and every request goes to 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.types import DeviceRequest

from ..build import RECIPE_LABEL, SMOKE_LABEL, owner_label
from ..discover import RecipeSpec
from ..layout import CACHE_DIR
from .checks import SMOKE_MODEL_DIR, SmokeCheck, SmokeFailure, SmokeSession, check_for, wait_until_exited, wait_until_healthy

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # its reaper image can't be pulled here
log = logging.getLogger("selfllm")
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class SmokeResult:
    ok: bool
    detail: str
    seconds: float
    reused: bool = False
    level: str = ""  # e.g. "cpu" or "gpu"
    phases: dict[str, float] = field(default_factory=dict)  # seconds of each phase: start, ready / run, check


def check_files(task: str) -> list[Path]:
    """The smoke code that judges a recipe of task kind `task`: the shared modules and its own task_<task>.py."""
    return [p for p in sorted(Path(__file__).parent.glob("*.py"))
            if not p.name.startswith("task_") or p.name == f"task_{task}.py"]


def check_code_hash(task: str) -> str:
    h = hashlib.sha256()
    for path in check_files(task):
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _cache_file(spec: RecipeSpec, image_id: str, gpu: bool) -> Path:
    code = check_code_hash(spec.recipe.task.value)
    name = f"{spec.key.replace('/', '-')}-{image_id.split(':')[-1][:16]}-{code}-{'gpu' if gpu else 'cpu'}.json"
    return CACHE_DIR / "smoke" / name


def cached_pass(spec: RecipeSpec, image_id: str, gpu: bool) -> SmokeResult | None:
    path = _cache_file(spec, image_id, gpu)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return SmokeResult(True, data["detail"], 0.0, reused=True, level=data.get("level", ""))


def remember_pass(spec: RecipeSpec, image_id: str, gpu: bool, result: SmokeResult) -> None:
    path = _cache_file(spec, image_id, gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"detail": result.detail, "level": result.level, "seconds": result.seconds}))


def publish_on_loopback(container, port: int) -> None:
    """Publish `port` on a random host port bound to 127.0.0.1 only (testcontainers' with_bind_ports
    takes no address; its `ports` mapping goes to docker-py as is)."""
    container.ports[f"{port}/tcp"] = (LOOPBACK, None)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


def remove_leftovers(client: docker.DockerClient, own: bool = False) -> int:
    """Containers whose run died before its own cleanup (own=True: this run's, after Ctrl-C)."""
    mine = str(os.getpid())
    removed = 0
    for container in client.containers.list(all=True, filters={"label": SMOKE_LABEL}):
        owner = container.labels.get(SMOKE_LABEL, "")
        if owner == mine if own else (owner != mine and not _alive(owner)):
            container.remove(force=True, v=True)
            removed += 1
    return removed


def container_env(check: SmokeCheck, recipe_env: dict[str, str] | None = None) -> dict[str, str]:
    """Every task runs on the tiny model that its command writes to SMOKE_MODEL_DIR; no hub is asked. recipe_env: the
    recipe's own smoke settings (recipe.yaml smoke.env), last, so they win."""
    threads = {"OMP_NUM_THREADS": str(check.threads), "TORCH_THREADS": str(check.threads)} if check.threads else {}
    return {"HF_HUB_OFFLINE": "1", "MODEL_PATH": SMOKE_MODEL_DIR, **threads, **check.env, **(recipe_env or {})}


def session_of(container, base_url: str, key: str, artifacts_dir: Path | None = None) -> SmokeSession:
    """A started testcontainers container as a SmokeSession (its exit code and logs on demand)."""
    wrapped = container.get_wrapped_container()

    def exit_code() -> int | None:
        wrapped.reload()
        return wrapped.attrs["State"]["ExitCode"] if wrapped.status == "exited" else None

    def logs() -> str:
        out, err = container.get_logs()
        return (out + err).decode(errors="replace")

    return SmokeSession(base_url, key, logs, exit_code, artifacts_dir)


def tiny_model_size(logs: str) -> str:
    """'tiny model: 1,234,567 parameters', from the line `selfllm smoke-model` logs; a smoke model that
    is missing from the logs or above the bound fails the recipe (a "tiny" model must be tiny)."""
    from selfllm_runtime.smoke_model import MAX_SMOKE_PARAMETERS, PARAMETERS_PATTERN

    found = {(m["architecture"], int(m["parameters"])): None for m in PARAMETERS_PATTERN.finditer(logs)}
    if not found:
        raise SmokeFailure("the container never logged the smoke model's parameter count (selfllm smoke-model)")
    for architecture, parameters in found:  # a family's variants (model.yaml `variants:`) are smoke models too
        if parameters > MAX_SMOKE_PARAMETERS:
            raise SmokeFailure(f"the smoke model {architecture} has {parameters:,} parameters, above the bound of "
                               f"{MAX_SMOKE_PARAMETERS:,}")
    return "; ".join(f"tiny {architecture}: {parameters:,} parameters" for architecture, parameters in found)


def run_smoke(spec: RecipeSpec, image: str, gpu: bool, artifacts_dir: Path) -> SmokeResult:
    from testcontainers.core.container import DockerContainer

    started = time.monotonic()
    level = "gpu" if gpu else "cpu"
    try:
        check = check_for(spec)
    except SmokeFailure as exc:
        return SmokeResult(False, str(exc), 0.0, level=level)
    port = spec.recipe.port
    kwargs: dict = {"labels": {**owner_label(), RECIPE_LABEL: spec.key}, "entrypoint": ["/bin/sh", "-c"]}
    if gpu:
        kwargs["device_requests"] = [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if check.shm_size:
        kwargs["shm_size"] = check.shm_size
    if check.network:
        kwargs["network_mode"] = check.network
    container = DockerContainer(image).with_command([check.command]).with_kwargs(**kwargs)
    for key, value in container_env(check, spec.recipe.smoke.env).items():
        container = container.with_env(key, value)
    if check.serves_http:
        publish_on_loopback(container, port)
    phases: dict[str, float] = {}
    mark = [time.monotonic()]

    def phase(name: str) -> None:  # the phase that just ended, and its seconds
        now = time.monotonic()
        phases[name] = round(now - mark[0], 2)
        mark[0] = now

    try:
        log.info("phase: container start %s", spec.key)
        container.start()
        base_url = f"http://{LOOPBACK}:{container.get_exposed_port(port)}" if check.serves_http else ""
        session = session_of(container, base_url, spec.key, artifacts_dir)
        phase("start")
        log.info("phase: %s %s", "health wait" if check.serves_http else "run to exit", spec.key)
        if check.serves_http:
            wait_until_healthy(session, check.health_path, spec.recipe.smoke.timeout_s)
            phase("ready")
        else:  # a task that runs to completion: verify sees its exit code and logs
            wait_until_exited(session, spec.recipe.smoke.timeout_s)
            phase("run")
        log.info("phase: check %s", spec.key)
        detail = check.verify(session)
        phase("check")
        return SmokeResult(True, f"{detail}; {tiny_model_size(session.logs())}", time.monotonic() - started,
                           level=level, phases=phases)
    except Exception as exc:  # noqa: BLE001 - any failure of one recipe's smoke is that recipe's FAIL
        message = str(exc) if isinstance(exc, SmokeFailure) else f"{type(exc).__name__}: {exc}"
        return SmokeResult(False, f"{message}{_tail(container)}", time.monotonic() - started, level=level,
                           phases=phases)
    finally:
        _save_logs(container, artifacts_dir / f"{spec.key.replace('/', '-')}.container.log")
        try:
            container.stop()
        except Exception:  # noqa: BLE001 - never mask the real outcome
            pass


def _tail(container) -> str:
    try:
        out, err = container.get_logs()
        lines = (out + err).decode(errors="replace").strip().splitlines()[-6:]
        return "\n    " + "\n    ".join(lines) if lines else ""
    except Exception:  # noqa: BLE001
        return ""


def _save_logs(container, path: Path) -> None:
    try:
        out, err = container.get_logs()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(out + err)
    except Exception:  # noqa: BLE001 - the container may never have started
        pass
