"""`selfllm lora dashboard [RUN_DIR]`: SwanLab's local dashboard (`swanlab watch`, served by the swanboard
package) over a finished or running run's `<run>/swanlog`, on HOST:PORT (the recipe's port: 6006, the port
AutoDL maps for custom services). RUN_DIR: a run folder, or its swanlog folder; unset: the newest run under
OUTPUT_DIR that has a SwanLab log. Bad input (no log, a taken port) is one line naming it, exit 2, before
anything starts; the dashboard has no login, so a non-loopback HOST gets one warning line."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ..access import ENV_HOST, check_port_free, is_loopback
from ..settings import SettingsError
from .tracking import SWANLOG

SWANLAB_DB = "runs.swanlab"  # the database swanlab's local mode writes in the swanlog folder


def find_swanlog(run_dir: Path | None, output_root: Path) -> Path:
    """The swanlog folder of run_dir (a run folder or the swanlog folder itself), else the newest under
    output_root; SettingsError naming what was looked at when there is none."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        for folder in (run_dir / SWANLOG, run_dir):
            if (folder / SWANLAB_DB).is_file():
                return folder
        raise SettingsError(f"{run_dir}: no SwanLab log here (looked for {run_dir / SWANLOG / SWANLAB_DB}); train "
                            f"with REPORT_TO=swanlab, or name a run folder under OUTPUT_DIR={output_root}")
    logs = sorted(Path(output_root).glob(f"*/{SWANLOG}/{SWANLAB_DB}"), key=lambda db: db.stat().st_mtime)
    if not logs:
        raise SettingsError(f"OUTPUT_DIR={output_root}: no run with a SwanLab log yet (<run>/{SWANLOG}/{SWANLAB_DB}); "
                            f"train first (REPORT_TO=swanlab, the default), or give the run folder")
    return logs[-1].parent


def watch_argv(swanlog: Path, host: str, port: int, python: str = sys.executable) -> list[str]:
    return [python, "-m", "swanlab", "watch", str(swanlog), "--host", host, "--port", str(port)]


def exposure_line(host: str, port: int) -> str | None:
    if is_loopback(host):
        return None
    return (f"selfllm: WARNING: the SwanLab dashboard on {host}:{port} has no login: anyone who reaches this port "
            f"sees the run's logs; bind {ENV_HOST}=127.0.0.1 and use an SSH tunnel to keep it private")


def serve(run_dir: Path | None, output_root: Path, host: str, port: int) -> None:
    """Check, then replace this process with `swanlab watch` (it serves until stopped)."""
    swanlog = find_swanlog(run_dir, output_root)
    if importlib.util.find_spec("swanboard") is None:
        raise SettingsError("the SwanLab dashboard needs the swanboard package (not in this image): "
                            "pip install swanboard==0.1.10b2")
    check_port_free(host, port)  # swanlab watch would move to another free port without a word
    if line := exposure_line(host, port):
        print(line, file=sys.stderr, flush=True)
    argv = watch_argv(swanlog, host, port)
    print(f"selfllm lora: SwanLab dashboard of {swanlog} on http://{host}:{port} ({' '.join(argv[1:])})",
          file=sys.stderr, flush=True)
    os.execv(argv[0], argv)
