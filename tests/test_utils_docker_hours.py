"""utils.py docker-hours: a CodeWithGPU-shaped server on 127.0.0.1, and real local containers."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402
from conftest import missing_prerequisite  # noqa: E402

# ---------------------------------------------------------------- a CodeWithGPU-shaped server


def image(index: int, hours: float | None) -> dict:
    return {"uuid": f"datawhalechina/self-llm/image-{index:03d}", "runtime_hour": hours, "name": f"image {index}"}


# Per user: the full image list the server pages through. 250 images -> 3 pages of 100.
IMAGES = {
    "Datawhale": [image(i, None if i % 50 == 7 else round(i * 0.25, 2)) for i in range(250)],
    "exact": [image(i, 1.0) for i in range(200)],  # two full pages, then an empty one
    "flaky": [image(1, 2.5), image(2, 0.5)],
}
SLOW_SECONDS = 1.5


class FakeCodeWithGPU(BaseHTTPRequestHandler):
    requests_seen: list[tuple[str, dict]] = []
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        user = url.path.removeprefix("/api/v1/image/home/")
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        with self.lock:
            self.requests_seen.append((user, query))
            seen = sum(1 for u, _ in self.requests_seen if u == user)
        if user == "flaky" and seen == 1 or user == "down":
            return self.reply(500, b"upstream exploded")
        if user == "missing":
            return self.reply(404, b"no such page")
        if user == "refused":
            return self.reply(200, {"code": "AuthFailed", "data": None, "message": "token expired\nplease log in"})
        if user == "accepted":
            return self.reply(202, {"code": "Success", "data": {"list": []}, "message": ""})
        if user == "shapeless":
            return self.reply(200, {"code": "Success", "data": None, "message": ""})
        if user == "garbled":
            return self.reply(200, b'{"code": "Success", "data": {"list": [')
        if user == "slow":
            time.sleep(SLOW_SECONDS)
            return self.reply(200, {"code": "Success", "data": {"list": []}, "message": ""})
        page, size = int(query["page_index"]), int(query["page_size"])
        items = IMAGES[user][(page - 1) * size: page * size]
        self.reply(200, {"code": "Success", "data": {"list": items, "page_index": page}, "message": ""})

    def reply(self, status: int, body: bytes | dict) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Traffic goes straight to 127.0.0.1, never through a proxy from the environment."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("CODEWITHGPU_API", raising=False)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeCodeWithGPU)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def seen():
    FakeCodeWithGPU.requests_seen.clear()
    return FakeCodeWithGPU.requests_seen


def hours(server: str, user: str, **options):
    return utils.calculate_docker_hours(api_base=server, user=user, echo=False, backoff=0, **options)


def expected(user: str) -> tuple[list[dict], float]:
    rows = [{"uuid": item["uuid"].split("/")[-1], "runtime_hour": item["runtime_hour"]}
            for item in IMAGES[user] if item["runtime_hour"] is not None]
    return rows, math.fsum(row["runtime_hour"] for row in rows)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "utils.py"), "docker-hours", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_reads_every_page_and_skips_null_hours(server, seen):
    docker_list, total = hours(server, "Datawhale")
    rows, total_expected = expected("Datawhale")
    assert [(u, q["page_index"], q["page_size"], q["username"]) for u, q in seen] == [
        ("Datawhale", str(page), "100", "Datawhale") for page in (1, 2, 3)]
    assert len(docker_list) == 245 and sorted(docker_list, key=lambda r: r["uuid"]) == rows
    assert [r["runtime_hour"] for r in docker_list] == sorted((r["runtime_hour"] for r in rows), reverse=True)
    assert docker_list[0] == {"uuid": "image-249", "runtime_hour": 62.25}
    assert total == pytest.approx(total_expected)


def test_stops_on_an_empty_page(server, seen):
    docker_list, total = hours(server, "exact")
    assert [q["page_index"] for _, q in seen] == ["1", "2", "3"]
    assert len(docker_list) == 200 and total == pytest.approx(200.0)


def test_api_base_from_environment(server, seen, monkeypatch):
    monkeypatch.setenv("CODEWITHGPU_API", server)
    docker_list, _ = utils.calculate_docker_hours(user="flaky", echo=False, backoff=0, retries=1)
    assert docker_list == [{"uuid": "image-001", "runtime_hour": 2.5}, {"uuid": "image-002", "runtime_hour": 0.5}]


def test_retries_a_5xx_then_succeeds(server, seen):
    docker_list, total = hours(server, "flaky", retries=2)
    assert len(seen) == 2 and total == pytest.approx(3.0) and len(docker_list) == 2


@pytest.mark.parametrize("user, retries, tries, message", [
    ("down", 2, 3, "answered HTTP 500 Internal Server Error (3 tries)"),  # 5xx: retried, then an error
    ("missing", 2, 1, "answered HTTP 404 Not Found"),  # 4xx: no retry
    ("accepted", 2, 1, "answered HTTP 202, expected 200"),
    ("refused", 2, 1, "code 'AuthFailed': token expired please log in"),
    ("garbled", 2, 1, "malformed JSON"),
    ("shapeless", 2, 1, "unexpected shape"),
    ("slow", 1, 2, "did not answer within 0.2 s (2 tries)"),
])
def test_failures_raise_one_clear_error(server, seen, user, retries, tries, message):
    started = time.monotonic()
    with pytest.raises(utils.UtilsError) as failure:
        hours(server, user, retries=retries, timeout=0.2)
    assert message in str(failure.value) and "\n" not in str(failure.value)
    assert len(seen) == tries
    assert time.monotonic() - started < 2 * SLOW_SECONDS


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as probe:  # a port on 127.0.0.1 that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(utils.UtilsError, match=r"cannot reach http://127\.0\.0\.1:\d+/.*\(2 tries\)"):
        utils.calculate_docker_hours(api_base=f"http://127.0.0.1:{port}", echo=False, retries=1, backoff=0)


def test_cli_json_lists_every_image_with_the_total(server):
    proc = run_cli("--api-base", server, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows, total = expected("Datawhale")
    assert sorted(report["images"], key=lambda r: r["uuid"]) == rows
    assert report["total_hours"] == pytest.approx(total) and report["source"] == "codewithgpu"


def test_cli_table_shows_rank_and_total(server):
    proc = run_cli("--api-base", server, "--user", "flaky", env={"COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert "image-001" in proc.stdout and "2.5" in proc.stdout and "3.0" in proc.stdout
    assert proc.stdout.index("image-001") < proc.stdout.index("image-002")


@pytest.mark.parametrize("user, fragment", [
    ("down", "HTTP 500"), ("missing", "HTTP 404"), ("accepted", "HTTP 202"), ("refused", "token expired"),
    ("garbled", "malformed JSON"), ("shapeless", "unexpected shape"), ("slow", "did not answer within 0.2 s"),
])
def test_cli_failures_exit_2_with_one_line(server, user, fragment):
    proc = run_cli("--api-base", server, "--user", user, "--timeout", "0.2", "--retries", "1", "--json")
    assert_one_line_error(proc, fragment)
    assert proc.stdout == ""


def test_parse_docker_time():
    assert utils.parse_docker_time("2024-05-01T10:00:00.123456789Z") == datetime(
        2024, 5, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)
    assert utils.parse_docker_time("2024-05-01T12:00:00+02:00") == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    assert utils.parse_docker_time("0001-01-01T00:00:00Z") is None
    assert utils.parse_docker_time("") is None


# ---------------------------------------------------------------- real containers (--source local)

TEST_IMAGE = "selfllm-test/busybox:latest"


@pytest.fixture(scope="session")
def busybox_image(docker_client, tmp_path_factory):
    """A tiny image imported from the host's static busybox (nothing is pulled)."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).is_file():
        missing_prerequisite("static busybox not found: apt-get install -y busybox-static")
    archive = tmp_path_factory.mktemp("busybox") / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "sleep"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    repository, tag = TEST_IMAGE.split(":")
    docker_client.api.import_image_from_file(str(archive), repository=repository, tag=tag)
    yield TEST_IMAGE
    docker_client.images.remove(TEST_IMAGE, force=True)


@pytest.fixture
def containers(docker_client, busybox_image):
    """Start labelled containers with unique recipe values; always removed afterwards."""
    started = []

    def run(recipe: str | None, command: list[str], start: bool = True):
        labels = {utils.RECIPE_LABEL: recipe} if recipe else {}
        if start:
            container = docker_client.containers.run(busybox_image, command, labels=labels, detach=True)
        else:
            container = docker_client.containers.create(busybox_image, command, labels=labels)
        started.append(container)
        return container

    yield run
    for container in started:
        container.remove(force=True)


@pytest.mark.docker
def test_local_hours_from_real_containers(docker_client, containers):
    prefix = f"selfllm-test-{uuid.uuid4().hex[:8]}"
    before = datetime.now(timezone.utc)
    finished = containers(f"{prefix}/fastapi", ["sh", "-c", "sleep 2"])
    again = containers(f"{prefix}/fastapi", ["sh", "-c", "sleep 1"])
    containers(f"{prefix}/lora", ["sleep", "300"])
    containers(f"{prefix}/vllm", ["sleep", "300"], start=False)  # never started: no hours
    containers(None, ["sleep", "300"])  # not this project's: ignored
    assert finished.wait(timeout=30)["StatusCode"] == 0 and again.wait(timeout=30)["StatusCode"] == 0
    now = datetime.now(timezone.utc) + timedelta(hours=1)

    docker_list, total = utils.calculate_docker_hours("local", echo=False, client=docker_client, now=now)

    mine = {row["uuid"]: row["runtime_hour"] for row in docker_list if row["uuid"].startswith(prefix)}
    assert set(mine) == {f"{prefix}/fastapi", f"{prefix}/lora"}
    assert 2.9 / 3600 <= mine[f"{prefix}/fastapi"] <= 10 / 3600  # 2 s + 1 s, summed per recipe
    running = (now - before).total_seconds() / 3600
    assert running - 60 / 3600 <= mine[f"{prefix}/lora"] <= running  # running: counted up to now
    assert total >= sum(mine.values())


@pytest.mark.docker
def test_cli_local_source(containers):
    prefix = f"selfllm-test-{uuid.uuid4().hex[:8]}"
    containers(f"{prefix}/webdemo", ["sleep", "300"])
    time.sleep(1)
    proc = run_cli("--source", "local", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["source"] == "local"
    mine = [row for row in report["images"] if row["uuid"] == f"{prefix}/webdemo"]
    assert len(mine) == 1 and 0 < mine[0]["runtime_hour"] < 60 / 3600


def test_cli_local_without_engine_exits_2():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = run_cli("--source", "local", env={"DOCKER_HOST": f"tcp://127.0.0.1:{port}"})
    assert_one_line_error(proc, "Docker engine not reachable")
