"""Known vulnerabilities in every lock and in the toolkit's own environment (pip-audit), judged
against a reviewed allow-list (audit-allowlist.yaml).

pip-audit only asks its vulnerability service about each pinned `name==version`: nothing is
installed. A pin with a local version label (torch==2.13.0+cpu, from PyTorch's own index) is
asked about as its public release (2.13.0: the same source, another build), which the service knows.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .layout import CACHE_DIR, LOCK_FILE, RECIPES_DIR, REPO_ROOT, STACKS_DIR, TASKS_DIR
from .locks import parse_lock

ALLOWLIST_FILE = REPO_ROOT / "audit-allowlist.yaml"
AUDIT_CACHE_DIR = CACHE_DIR / "pip-audit"
TOOLKIT_ENV = "toolkit environment (pyproject.toml)"


class AuditError(RuntimeError):
    pass


class AllowEntry(BaseModel):
    """One accepted vulnerability: why it does not matter here, and when to look at it again."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1)  # the advisory id pip-audit reports (PYSEC-…, GHSA-…) or one of its aliases (CVE-…)
    package: str = Field(min_length=1)
    reason: str = Field(min_length=10)
    review_by: datetime.date

    @property
    def key(self) -> str:
        return canonical(self.package)


@dataclass(frozen=True)
class Finding:
    package: str  # canonical name
    version: str
    ids: tuple[str, ...]  # the advisory id first, then its aliases
    fix_versions: tuple[str, ...]
    sources: tuple[str, ...]  # the locks (or the toolkit environment) that pin it

    def __str__(self) -> str:
        fix = f"fixed in {', '.join(self.fix_versions)}" if self.fix_versions else "no fix yet"
        return f"{self.package}=={self.version}: {' / '.join(self.ids)} ({fix}) in {', '.join(self.sources)}"


@dataclass(frozen=True)
class AuditResult:
    findings: list[Finding]
    unaudited: list[str]  # "name==version: why" for each pin the service could not answer about


@dataclass(frozen=True)
class Verdict:
    unallowed: list[Finding]
    expired: list[AllowEntry]
    stale: list[AllowEntry]  # allowed ids that no finding carries any more

    @property
    def ok(self) -> bool:
        return not (self.unallowed or self.expired or self.stale)


def canonical(name: str) -> str:
    return name.replace("_", "-").replace(".", "-").lower()


def lock_files() -> list[Path]:
    """Every lock: the task kinds', a recipe's own (copies of its task kind's, or its family's own) and the stacks'."""
    patterns = [(TASKS_DIR, "*/requirements*.lock"), (RECIPES_DIR, "*/*/requirements*.lock"), (STACKS_DIR, f"*/{LOCK_FILE}")]
    return sorted(path for root, pattern in patterns for path in root.glob(pattern))


def requirement(name: str, version: str) -> str:
    """`name==version` as the service knows it: a local version label is dropped (see the module doc)."""
    return f"{canonical(name)}=={version.split('+', 1)[0]}\n"


def audit_input(lock: Path) -> str:
    return "".join(requirement(pin.name, pin.version) for pin in parse_lock(lock))


def load_allowlist(path: Path = ALLOWLIST_FILE) -> list[AllowEntry]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    entries = (data or {}).get("allow") or []
    try:
        return [AllowEntry.model_validate(entry) for entry in entries]
    except ValidationError as exc:
        raise AuditError(f"{path}: {exc}") from exc


def run_pip_audit(args: list[str], osv_url: str | None = None, timeout_s: int = 300) -> dict:
    """pip-audit's JSON report for these source arguments (its PyPI service, or an OSV API at osv_url)."""
    service = ["--vulnerability-service", "osv", "--osv-url", osv_url] if osv_url else []
    AUDIT_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip_audit", *args, *service, "--format", "json", "--output", str(out),
                   "--cache-dir", str(AUDIT_CACHE_DIR), "--progress-spinner", "off", "--aliases", "on"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if not out.is_file():  # exit 1 with a report means "vulnerabilities found"; no report is an error
            raise AuditError(f"pip-audit failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def audit_requirements(text: str, osv_url: str | None = None) -> dict:
    """pip-audit over `name==version` lines, resolving nothing and installing nothing."""
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(text, encoding="utf-8")
        return run_pip_audit(["--requirement", str(requirements), "--no-deps", "--disable-pip"], osv_url)


def findings_of(report: dict, source: str) -> AuditResult:
    findings, unaudited = [], []
    for dep in report.get("dependencies", []):
        name, version = canonical(dep["name"]), dep.get("version", "?")
        if "skip_reason" in dep:
            unaudited.append(f"{name}=={version}: {dep['skip_reason']}")
        for vuln in dep.get("vulns", []):
            findings.append(Finding(name, version, (vuln["id"], *vuln.get("aliases", [])),
                                    tuple(vuln.get("fix_versions", [])), (source,)))
    return AuditResult(findings, unaudited)


def audit_locks(locks: list[Path], osv_url: str | None = None) -> AuditResult:
    """One pip-audit run per distinct lock content (a recipe's lock is mostly a copy of its task kind's)."""
    by_content: dict[str, list[Path]] = {}
    for lock in locks:
        by_content.setdefault(hashlib.sha256(lock.read_bytes()).hexdigest(), []).append(lock)
    findings: dict[tuple[str, str, str], Finding] = {}
    unaudited: set[str] = set()
    for paths in by_content.values():
        names = tuple(str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p) for p in paths)
        result = findings_of(audit_requirements(audit_input(paths[0]), osv_url), ", ".join(names))
        unaudited.update(result.unaudited)
        for finding in result.findings:
            key = (finding.package, finding.version, finding.ids[0])
            seen = findings.get(key)
            findings[key] = finding if seen is None else Finding(
                finding.package, finding.version, finding.ids, finding.fix_versions, seen.sources + finding.sources)
    return AuditResult(list(findings.values()), sorted(unaudited))


def audit_toolkit_environment(osv_url: str | None = None) -> AuditResult:
    """The environment this Python runs in (the toolkit's dependencies and test extra, as pyproject.toml
    installed them), less the toolkit itself."""
    names = {(d.metadata["Name"] or "", d.version) for d in importlib.metadata.distributions()}
    text = "".join(sorted(requirement(n, v) for n, v in names if n and canonical(n) != "selfllm-recipes"))
    return findings_of(audit_requirements(text, osv_url), TOOLKIT_ENV)


def judge(findings: list[Finding], allowlist: list[AllowEntry], today: datetime.date) -> Verdict:
    def allows(entry: AllowEntry, finding: Finding) -> bool:
        return entry.key == finding.package and entry.id in finding.ids

    unallowed = [f for f in findings if not any(allows(e, f) for e in allowlist)]
    expired = [e for e in allowlist if e.review_by < today]
    stale = [e for e in allowlist if not any(allows(e, f) for f in findings)]
    return Verdict(unallowed, expired, stale)


def explain(verdict: Verdict, allowlist_file: Path = ALLOWLIST_FILE) -> str:
    lines = [f"not allowed: {f}" for f in verdict.unallowed]
    lines += [f"expired ({e.review_by}): {e.id} in {e.package}: review it, then move review_by or fix the pin"
              for e in verdict.expired]
    lines += [f"stale: {e.id} in {e.package} matches no finding any more: remove it" for e in verdict.stale]
    return f"{allowlist_file.name}: " + "\n  ".join(["", *lines])
