"""Known vulnerabilities (pip-audit) in every lock and in the toolkit's environment, against the
reviewed allow-list audit-allowlist.yaml: an unreviewed finding, an expired entry and a stale entry
each fail. The checker itself is tested through pip-audit against a local OSV API on 127.0.0.1."""
from __future__ import annotations

import datetime
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selfllm_recipes.audit import (
    ALLOWLIST_FILE,
    AllowEntry,
    AuditError,
    Finding,
    audit_locks,
    audit_requirements,
    audit_toolkit_environment,
    explain,
    findings_of,
    judge,
    load_allowlist,
    lock_files,
)
from selfllm_recipes.layout import RECIPES_DIR, STACKS_DIR, TASKS_DIR

# A real advisory: requests < 2.20.0 sends the Authorization header on an https → http redirect.
KNOWN_VULNERABLE = "requests==2.19.0\n"
ADVISORY = {"id": "PYSEC-2018-28", "aliases": ["CVE-2018-18074", "GHSA-x84v-xcm2-53pg"],
            "summary": "Authorization header leaked on an https to http redirect",
            "affected": [{"package": {"name": "requests", "ecosystem": "PyPI"},
                          "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "2.20.0"}]}]}]}
TODAY = datetime.date.today()


@pytest.fixture
def osv_api() -> Iterator[tuple[str, list[dict]]]:
    """An OSV query API on 127.0.0.1 that knows ADVISORY for requests 2.19.0; yields (url, queries seen)."""
    queries: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            queries.append(query)
            hit = query["package"]["name"] == "requests" and query["version"] == "2.19.0"
            body = json.dumps({"vulns": [ADVISORY]} if hit else {}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/query", queries
    finally:
        server.shutdown()
        server.server_close()


def entry(vuln_id: str = "CVE-2018-18074", package: str = "Requests", days: int = 30) -> AllowEntry:
    return AllowEntry(id=vuln_id, package=package, reason="only talks to 127.0.0.1 in tests",
                      review_by=TODAY + datetime.timedelta(days=days))


FINDING = Finding("requests", "2.19.0", ("PYSEC-2018-28", "CVE-2018-18074"), ("2.20.0",), ("tasks/x/requirements.lock",))


def test_every_lock_is_audited():
    locks = lock_files()
    assert any(p.is_relative_to(TASKS_DIR) for p in locks)
    assert any(p.is_relative_to(RECIPES_DIR) for p in locks)
    assert any(p.is_relative_to(STACKS_DIR) for p in locks)
    assert set(TASKS_DIR.glob("*/requirements*.lock")) <= set(locks)


def test_policy_unreviewed_expired_and_stale_entries_fail():
    assert judge([FINDING], [], TODAY).unallowed == [FINDING]
    allowed = judge([FINDING], [entry()], TODAY)  # by an alias, package name in any spelling
    assert allowed.ok, explain(allowed)
    expired = judge([FINDING], [entry(days=-1)], TODAY)
    assert not expired.ok and expired.expired and not expired.unallowed
    other_package = judge([FINDING], [entry(package="urllib3")], TODAY)
    assert other_package.unallowed == [FINDING] and len(other_package.stale) == 1
    stale = judge([], [entry()], TODAY)
    assert not stale.ok and "matches no finding any more" in explain(stale)


def test_allowlist_entries_need_a_reason_and_a_review_date(tmp_path):
    path = tmp_path / "allow.yaml"
    path.write_text("allow:\n  - {id: CVE-2018-18074, package: requests, reason: fine}\n")
    with pytest.raises(AuditError, match="reason|review_by"):
        load_allowlist(path)
    path.write_text("allow:\n  - {id: CVE-2018-18074, package: requests, reason: only used against 127.0.0.1,"
                    " review_by: 2030-01-31}\n")
    assert load_allowlist(path) == [AllowEntry(id="CVE-2018-18074", package="requests",
                                               reason="only used against 127.0.0.1", review_by=datetime.date(2030, 1, 31))]
    load_allowlist(ALLOWLIST_FILE)  # the repository's own list is valid


def test_pip_audit_finds_a_vulnerable_pin_in_a_lock(tmp_path, osv_api):
    """End to end through pip-audit: a hashed lock with a known-vulnerable pin fails the audit, and
    a pin with a local version label is asked about as its public release."""
    url, queries = osv_api
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"requests==2.19.0 \\\n    --hash=sha256:{'0' * 64}\n"
                    f"torch==2.13.0+cpu \\\n    --hash=sha256:{'1' * 64}\n")
    copy = tmp_path / "copy" / "requirements.lock"
    copy.parent.mkdir()
    copy.write_bytes(lock.read_bytes())
    result = audit_locks([lock, copy], osv_url=url)
    assert {(q["package"]["name"], q["version"]) for q in queries} == {("requests", "2.19.0"), ("torch", "2.13.0")}
    assert len(queries) == 2  # one pip-audit run for both copies
    (finding,) = result.findings
    assert finding.package == "requests" and finding.ids[0] == "PYSEC-2018-28" and "CVE-2018-18074" in finding.ids
    assert finding.fix_versions == ("2.20.0",) and finding.sources == (f"{lock}, {copy}",)
    assert not judge(result.findings, [], TODAY).ok
    assert judge(result.findings, [entry()], TODAY).ok


def vulnerability_service_answers() -> bool:
    """Whether pip-audit's service (PyPI's JSON API) knows the advisory of a known-vulnerable pin."""
    try:
        report = audit_requirements(KNOWN_VULNERABLE)
    except AuditError:
        return False
    return any(findings_of(report, "probe").findings)


def test_every_lock_and_the_toolkit_have_no_unreviewed_vulnerability():
    if not vulnerability_service_answers():
        pytest.skip("pip-audit's vulnerability service (PyPI's per-release JSON API) does not answer here: "
                    f"it reports nothing for {KNOWN_VULNERABLE.strip()}, so the locks cannot be audited")
    locks = audit_locks(lock_files())
    toolkit = audit_toolkit_environment()
    unaudited = locks.unaudited + toolkit.unaudited
    assert not unaudited, "pins the service could not audit:\n  " + "\n  ".join(unaudited)
    verdict = judge(locks.findings + toolkit.findings, load_allowlist(), TODAY)
    assert verdict.ok, explain(verdict)
