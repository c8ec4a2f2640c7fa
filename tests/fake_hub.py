"""Local HTTP servers on 127.0.0.1 standing in for the model hubs and the data host in tests.

FakeHuggingFaceHub implements the part of the Hugging Face Hub API that
huggingface_hub.snapshot_download uses (HF_ENDPOINT pointed at it): repo info with the commit sha
and siblings, the recursive tree listing, and HEAD/GET of /{repo}/resolve/{revision}/{file} with
X-Repo-Commit, ETag and byte Range support. It can cut a file's body mid-way (the connection closes
after N bytes) and refuse Range requests (503, as a hub that went down), and it logs every request.

FakeModelScopeHub implements the part of ModelScope's /api/v1 API that modelscope.snapshot_download
(modelscope 1.40.2, delegating to modelscope-hub 0.5.1) uses when given endpoint=<its url>:
  GET /api/v1/repos/internalAccelerationInfo      the region probe before downloads (answered: no
                                                   cloud region, so no x-aliyun-region-id header)
  GET /api/v1/models/{repo}/repo/files?Revision=master&Recursive=True
                                                   the file listing {"Data": {"Files": [{Path, Name,
                                                   Type: "blob", Size, Sha256}]}}; sizes and hashes are
                                                   what the client checks every file against
  GET /api/v1/models/{repo}/repo?Revision=master&FilePath={file}
                                                   the file itself, with byte Range support (206 and
                                                   Content-Range), as the client resumes a
                                                   `{file}.incomplete` with `Range: bytes={size}-`
That is all it asks: no revision listing, no repo info (asked only when a listing scoped by
allow_patterns finds nothing). Anything else is a 404 in ModelScope's JSON envelope. Cuts, refused
ranges (503) and the request log (path with its query) work as in FakeHuggingFaceHub.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Logged:
    method: str
    path: str
    range: str | None


@dataclass
class FakeHuggingFaceHub:
    repo_id: str
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    cuts: dict[str, int] = field(default_factory=dict)  # file → bytes sent before the next full GET is cut
    refuse_ranges: bool = False
    log: list[Logged] = field(default_factory=list)
    url: str = ""

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path) -> FakeHuggingFaceHub:
        """Every file under folder (subfolders too, as `1_Pooling/config.json`)."""
        return cls(repo_id, _folder_files(folder))

    def requests(self, method: str, name: str) -> list[Logged]:
        suffix = f"/resolve/{self.sha}/{name}", f"/resolve/main/{name}"
        return [r for r in self.log if r.method == method and r.path.endswith(suffix)]

    def _info(self) -> dict:
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.sha, "private": False, "gated": False,
                "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": name} for name in self.files]}

    def _tree(self) -> list[dict]:
        return [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in self.files.items()]

    def handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.log.append(Logged(request.command, path, request.headers.get("Range")))
        api = f"/api/models/{self.repo_id}"
        if path in (api, f"{api}/revision/main", f"{api}/revision/{self.sha}"):
            return _send(request, 200, json.dumps(self._info()).encode(), "application/json", body=body)
        if path in (f"{api}/tree/main", f"{api}/tree/{self.sha}"):
            return _send(request, 200, json.dumps(self._tree()).encode(), "application/json", body=body)
        match = re.fullmatch(rf"/{re.escape(self.repo_id)}/resolve/(main|{self.sha})/(.+)", path)
        if not match or match.group(2) not in self.files:
            return _send(request, 404, b"not found", headers={"X-Error-Code": "EntryNotFound"}, body=body)
        name, data = match.group(2), self.files[match.group(2)]
        headers = {"X-Repo-Commit": self.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        _send_file(request, name, data, headers, body=body, cuts=self.cuts, refuse_ranges=self.refuse_ranges)


@dataclass
class FakeModelScopeHub:
    """ModelScope's /api/v1 file listing and file download for one model repo (see the module docstring)."""

    repo_id: str
    files: dict[str, bytes]
    revision: str = "master"  # the branch snapshot_download asks for when it is given no revision
    cuts: dict[str, int] = field(default_factory=dict)  # file → bytes sent before the next full GET is cut
    refuse_ranges: bool = False
    log: list[Logged] = field(default_factory=list)  # path with its query: /api/v1/models/o/n/repo?…&FilePath=x
    url: str = ""

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path) -> FakeModelScopeHub:
        """Every file under folder (subfolders too, as `1_Pooling/config.json`)."""
        return cls(repo_id, _folder_files(folder))

    def requests(self, method: str, name: str) -> list[Logged]:
        """The logged downloads of file `name`."""
        found = []
        for logged in self.log:
            path, _, query = logged.path.partition("?")
            if (logged.method == method and path == f"/api/v1/models/{self.repo_id}/repo"
                    and parse_qs(query).get("FilePath") == [name]):
                found.append(logged)
        return found

    def _listing(self) -> list[dict]:
        return [{"Name": name.rsplit("/", 1)[-1], "Path": name, "Type": "blob", "Size": len(data),
                 "Sha256": hashlib.sha256(data).hexdigest(), "Revision": self.revision}
                for name, data in self.files.items()]

    def handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        parts = urlsplit(request.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.log.append(Logged(request.command, f"{path}?{parts.query}" if parts.query else path,
                               request.headers.get("Range")))
        api = f"/api/v1/models/{self.repo_id}"
        revision = query.get("Revision", [self.revision])[0]
        if path == "/api/v1/repos/internalAccelerationInfo":  # not inside an Alibaba Cloud region
            return _send_json(request, 200, {"InternalRegionQueryAddress": ""}, body=body)
        if path == f"{api}/repo/files" and revision == self.revision:
            return _send_json(request, 200, {"Files": self._listing()}, body=body)
        name = query.get("FilePath", [""])[0]
        if path == f"{api}/repo" and revision == self.revision and name in self.files:
            return _send_file(request, name, self.files[name], {}, body=body, cuts=self.cuts,
                              refuse_ranges=self.refuse_ranges)
        return _send_json(request, 404, None, body=body, message=f"not found: {request.path}")


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _send_file(request: BaseHTTPRequestHandler, name: str, data: bytes, headers: dict[str, str], *, body: bool,
               cuts: dict[str, int], refuse_ranges: bool) -> None:
    """data, or the byte range asked for (206); a ranged GET is refused (503) when refuse_ranges, and a
    full GET of a file in cuts is cut after that many bytes (once: the entry is removed)."""
    headers = {**headers, "Accept-Ranges": "bytes"}
    ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range") or "")
    if ranged and body and refuse_ranges:
        return _send(request, 503, b"hub down", body=body)
    if ranged and body:
        start = int(ranged.group(1))
        end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _send(request, 206, data[start:end + 1], "application/octet-stream", headers, body=body)
    if body and name in cuts:
        return _send(request, 200, data, "application/octet-stream", headers, body=body, cut=cuts.pop(name))
    return _send(request, 200, data, "application/octet-stream", headers, body=body)


def _send_json(request: BaseHTTPRequestHandler, status: int, data: object, *, body: bool, message: str = "success"
               ) -> None:
    """ModelScope's envelope: {"Code", "Data", "Message", "RequestId", "Success"}."""
    envelope = {"Code": status, "Data": data, "Message": message, "RequestId": "fake-request", "Success": status < 400}
    _send(request, status, json.dumps(envelope).encode(), "application/json", body=body)


def _send(request: BaseHTTPRequestHandler, status: int, data: bytes, content_type: str = "text/plain",
          headers: dict[str, str] | None = None, *, body: bool = True, cut: int | None = None) -> None:
    request.send_response(status)
    for key, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
        request.send_header(key, value)
    request.end_headers()
    if not body:
        return
    request.wfile.write(data if cut is None else data[:cut])
    request.wfile.flush()
    if cut is not None:  # the body stops short of Content-Length: the client sees the connection drop
        request.close_connection = True


@dataclass
class StaticFiles:
    """GET of path → bytes; `chunked` paths are sent without Content-Length (the size shows only while reading)."""

    files: dict[str, bytes]
    chunked: set[str] = field(default_factory=set)
    log: list[Logged] = field(default_factory=list)
    url: str = ""

    def handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = urlsplit(request.path).path
        self.log.append(Logged(request.command, path, request.headers.get("Range")))
        if path not in self.files:
            return _send(request, 404, b"not found", body=body)
        data = self.files[path]
        if path not in self.chunked:
            return _send(request, 200, data, "application/json", body=body)
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()
        for start in range(0, len(data), 4096):
            piece = data[start:start + 4096]
            request.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        request.wfile.write(b"0\r\n\r\n")


@contextmanager
def serve(site: FakeHuggingFaceHub | FakeModelScopeHub | StaticFiles) -> Iterator[str]:
    """Serve site on 127.0.0.1 (a free port) in a thread; yields (and sets site.url to) its base URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            site.handle(self, body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            site.handle(self, body=False)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    site.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield site.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def closed_port_url() -> str:
    """http://127.0.0.1:<port> where nothing listens (connections are refused at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
