"""Fully pinned, hashed requirement locks: parse, validate, regenerate (uv pip compile)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from selfllm_runtime.metadata import MetadataError

from .layout import LOCK_FILE, LOCK_INPUT

# One resolution for every image: Ubuntu 22.04's Python 3.10 on x86_64 Linux (production). The same
# versions install on Debian 12's 3.11 (the local stand-in); a universal lock would fork versions
# per Python instead. Hashes cover every wheel of each pinned version.
LOCK_PYTHON = "3.10"
OVERRIDES_FILE = "overrides.txt"  # uv pip compile --override of a lock input's folder
LOCK_PLATFORM = "x86_64-manylinux_2_28"
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(?P<version>[^\s;]+)\s*(;(?P<marker>.*))?$")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    marker: str
    hashes: tuple[str, ...]
    line: int

    @property
    def key(self) -> str:
        return re.sub(r"[-_.]+", "-", self.name).lower()


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations; drop comments and blanks; keep the first line number."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append((start, buf.strip()))
        buf = ""
    return out


def parse_lock(path: Path) -> list[Pin]:
    """Every requirement must be `name==version` with at least one --hash; else a MetadataError."""
    if not path.is_file():
        raise MetadataError(path, "(file)", f"missing; run `make lock` to generate it from {LOCK_INPUT}")
    pins: list[Pin] = []
    for number, line in _logical_lines(path.read_text(encoding="utf-8")):
        if line.startswith("-"):
            raise MetadataError(path, f"line {number}", f"pip option {line.split()[0]!r} is not allowed in a lock")
        spec, *hash_parts = line.split("--hash=")
        match = _PIN.match(spec.strip())
        if not match:
            raise MetadataError(path, f"line {number}", f"{spec.strip()!r} is not pinned with ==")
        hashes = tuple(h.strip() for h in hash_parts if h.strip())
        if not hashes:
            raise MetadataError(path, f"line {number}", f"{match['name']}=={match['version']} has no --hash")
        pins.append(Pin(match["name"], match["version"], (match["marker"] or "").strip(), hashes, number))
    if not pins:
        raise MetadataError(path, "(file)", "no requirements")
    return pins


def check_against_stack(recipe_lock: Path, recipe_pins: list[Pin], stack_lock: Path, stack_pins: list[Pin]) -> None:
    """The recipe must pin the stack's packages at the stack's versions, or the shared layer is wasted."""
    mine = {(p.key, p.marker): p for p in recipe_pins}
    for pin in stack_pins:
        other = mine.get((pin.key, pin.marker))
        if other is None or other.version != pin.version:
            found = f"{other.version}" if other else "nothing"
            raise MetadataError(
                recipe_lock,
                f"line {other.line}" if other else pin.name,
                f"{pin.name} must be =={pin.version} as in {stack_lock} (found {found}); regenerate with `make lock`",
            )


def uv_binary() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).exists():
        raise RuntimeError("uv not found: install the test extras (`pip install -e .[test]`)")
    return found


def compile_lock(folder: Path, constraints: Path | None = None, extra_args: list[str] | None = None,
                 lock_name: str = LOCK_FILE, python: str = LOCK_PYTHON, platform: str = LOCK_PLATFORM) -> Path:
    """Regenerate folder/<lock_name> from the same name with .in (hashed, for one Python and platform)."""
    source = folder / (LOCK_INPUT if lock_name == LOCK_FILE else lock_name.removesuffix(".lock") + ".in")
    if not source.is_file():
        raise MetadataError(source, "(file)", "missing: the hand-edited input of the lock")
    cmd = [uv_binary(), "pip", "compile", "--quiet", "--generate-hashes", "--no-header",
           "--python-version", python, "--python-platform", platform, str(source), "-o", str(folder / lock_name)]
    if constraints is not None:
        cmd += ["--constraint", str(constraints)]
    if (folder / OVERRIDES_FILE).is_file():  # a dependency's too-tight pin the folder overrides (its file says why)
        cmd += ["--override", str(folder / OVERRIDES_FILE)]
    cmd += extra_args or []
    subprocess.run(cmd, check=True)
    return folder / lock_name
