"""No credentials in what an image ships besides its files (config Env, Labels, `docker history`):
the scanner (selfllm_recipes/secret_scan.py) on fixtures, the Dockerfiles and the build plan that keep
index URLs out of ENV, and (Docker) every local selfllm/* image."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import missing_prerequisite

from selfllm_recipes.cli import main as matrix_main
from selfllm_recipes.discover import load_spec, load_stack
from selfllm_recipes.images import NodeKind, plan_images
from selfllm_recipes.layout import IMAGE_PREFIX, RECIPES_DIR, REPO_ROOT, STACKS_DIR
from selfllm_recipes.secret_scan import has_secret_name, history_build_args, scan_config

# What the images' configs hold today (base + a recipe): nothing here may be flagged.
CLEAN_CONFIG = {
    "Env": ["PATH=/opt/selfllm/runtime/bin:/opt/venv/bin:/usr/local/sbin:/usr/bin", "PIP_NO_CACHE_DIR=1",
            "HF_ENDPOINT=https://hf-mirror.com", "MODEL_CACHE=/root/autodl-tmp", "RECIPE_DIR=/opt/recipe",
            "NVIDIA_REQUIRE_CUDA=cuda>=12.1 brand=tesla,driver>=470", "GPG_KEY=7169605F62C751356D054A26A821E680E5FA6305",
            "API_KEY="],
    "Labels": {"org.opencontainers.image.title": "selfllm/qwen3-fastapi:latest",
               "io.selfllm.input-hash": "0123456789abcdef",
               "io.selfllm.pip-freeze": "fastapi==0.115.0\nhf-xet==1.1.0\nscikit-learn==1.5.0\nhuggingface-hub==0.30.0",
               "maintainer": "NVIDIA CORPORATION <cudatools@nvidia.com>"},
}
CLEAN_HISTORY = [
    {"CreatedBy": "/bin/sh -c #(nop)  ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PIP_NO_CACHE_DIR=1"},
    {"CreatedBy": "|1 PIP_INDEX_URL=https://pypi.tuna.tsinghua.edu.cn/simple /bin/sh -c pip install --no-deps "
                  "--require-hashes -r /opt/selfllm/stack.lock"},
    {"CreatedBy": "RUN |2 RECIPE_LOCK=requirements.lock PIP_INDEX_URL=https://pypi.org/simple /bin/sh -c pip install "
                  "--no-deps --require-hashes -r \"/opt/recipe/${RECIPE_LOCK}\" # buildkit"},
    {"CreatedBy": "git clone git@github.com:datawhalechina/self-llm.git"},
]


def test_what_the_images_hold_today_is_clean():
    assert scan_config(CLEAN_CONFIG, CLEAN_HISTORY) == []


def test_old_style_env_pip_index_url_with_credentials_is_flagged():
    old = {"Env": [*CLEAN_CONFIG["Env"], "PIP_INDEX_URL=https://user:s3cr3tpw@mirror.example.com/simple"]}
    findings = scan_config(old)
    assert [(f.where, f.name) for f in findings] == [("Config.Env", "PIP_INDEX_URL")]
    assert "credentials" in findings[0].reason and "s3cr3tpw" not in str(findings[0])  # the value is never repeated
    history = [{"CreatedBy": "/bin/sh -c #(nop)  ENV PIP_INDEX_URL=https://user:pass@mirror.example.com/simple"}]
    assert [f.where for f in scan_config({}, history)] == ["history[0]"]


@pytest.mark.parametrize("entry", [
    "API_KEY=sk-my-secret", "HF_TOKEN=abc", "HUGGING_FACE_HUB_TOKEN=x", "AWS_SECRET_ACCESS_KEY=y",
    "DB_PASSWORD=z", "OPENAI_APIKEY=w", "PIP_EXTRA_INDEX_URL=https://__token__:pypi-AgEI@pypi.example/simple",
    "SOME_SETTING=hf_" + "a" * 34, "OTHER=sk-" + "b" * 40, "X=ghp_" + "c" * 36, "Y=AKIAABCDEFGHIJKLMNOP",
])
def test_secret_env_is_flagged(entry):
    findings = scan_config({"Env": [entry]})
    assert len(findings) >= 1 and findings[0].where == "Config.Env" and findings[0].name == entry.split("=")[0]


def test_labels_and_history_are_scanned():
    labels = {"io.selfllm.pip-freeze": "pkg @ https://bob:hunter2@git.example.com/pkg.tar.gz",
              "com.example.api-token": "t0k3n"}
    assert sorted(f.name for f in scan_config({"Labels": labels})) == ["com.example.api-token", "io.selfllm.pip-freeze"]
    history = [{"CreatedBy": "|1 HF_TOKEN=t0k3n /bin/sh -c huggingface-cli download x"},
               {"CreatedBy": "|1 PIP_INDEX_URL=https://u:p@mirror.example/simple /bin/sh -c pip install x"},
               {"CreatedBy": "/bin/sh -c echo hf_" + "d" * 34 + " > /root/.cache/token"}]
    assert [(f.where, f.name) for f in scan_config({}, history)] == [
        ("history[0]", "HF_TOKEN"), ("history[1]", ""), ("history[2]", "")]


def test_history_build_args_are_parsed():
    assert history_build_args("|2 A=x B=y=z /bin/sh -c true") == [("A", "x"), ("B", "y=z")]
    assert history_build_args("RUN |1 PIP_INDEX_URL=https://pypi.org/simple /bin/sh -c pip") == [
        ("PIP_INDEX_URL", "https://pypi.org/simple")]
    assert history_build_args("/bin/sh -c true") == []


def test_secret_names():
    assert all(map(has_secret_name, ["API_KEY", "hf_token", "io.x.api-token", "APIKEY", "SSH_AUTH"]))
    assert not any(map(has_secret_name, ["GPG_KEY", "PIP_INDEX_URL", "io.selfllm.input-hash", "MONKEY_BUSINESS",
                                         "org.opencontainers.image.authors"]))


# ----------------------------------------------------------------------------- the Dockerfiles and the plan

def _instructions(text: str) -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def _dockerfiles() -> list[Path]:
    found = [p for p in REPO_ROOT.glob("**/Dockerfile") if ".venv" not in p.parts]
    return [*found, REPO_ROOT / "tasks" / "Dockerfile.j2"]


def test_no_dockerfile_sets_an_index_url_as_env():
    index_setting = re.compile(r"(INDEX_URL|FIND_LINKS|TRUSTED_HOST)\b", re.IGNORECASE)
    offenders = []
    for dockerfile in _dockerfiles():
        for instruction in _instructions(dockerfile.read_text()):
            words = instruction.split(None, 2)
            kind = words[1] if words[0].upper() == "ONBUILD" and len(words) > 1 else words[0]
            if kind.upper() == "ENV" and index_setting.search(instruction):
                offenders.append(f"{dockerfile.relative_to(REPO_ROOT)}: {instruction[:80]}")
    assert not offenders, offenders


@pytest.mark.parametrize("stack", sorted(p.name for p in STACKS_DIR.iterdir() if p.is_dir()))
def test_every_pip_step_gets_the_index_as_a_build_arg(stack):
    # a stack folder's own Dockerfile, else the shared one the CUDA stacks build with
    instructions = _instructions(load_stack(stack, STACKS_DIR / stack).dockerfile.read_text())
    for prefix in ("", "ONBUILD "):  # the stack's own pip step, then the recipe build's (ONBUILD)
        steps = [i for i in instructions if i.startswith(prefix) and (
            i[len(prefix):].startswith("ARG PIP_INDEX_URL=") or (i[len(prefix):].startswith("RUN ") and "pip install" in i))]
        assert steps and steps[0][len(prefix):].startswith("ARG PIP_INDEX_URL="), (prefix, steps)
        assert any("pip install" in s for s in steps[1:]), (prefix, steps)


def test_plan_passes_the_index_to_every_pip_build_and_hf_endpoint_to_the_base():
    spec = load_spec(RECIPES_DIR / "qwen3" / "fastapi")
    extra = {"PIP_INDEX_URL": "https://pypi.tuna.tsinghua.edu.cn/simple", "HF_ENDPOINT": "https://hf-mirror.com"}
    nodes = plan_images([spec], "base:img", "sha256:0", extra)
    for node in nodes:
        wants_index = node.kind in (NodeKind.stack, NodeKind.recipe)
        assert (node.buildargs.get("PIP_INDEX_URL") == extra["PIP_INDEX_URL"]) is wants_index, node.key
        assert ("HF_ENDPOINT" in node.buildargs) is (node.kind is NodeKind.base), node.key


def test_matrix_refuses_an_index_url_with_credentials(capsys, monkeypatch):
    from selfllm_recipes import cli

    def no_engine() -> None:
        raise AssertionError("the refusal must come before any build")

    monkeypatch.setattr(cli, "connect", no_engine)
    assert matrix_main(["matrix", "--pip-index-url", "https://user:s3cr3tpw@mirror.example.com/simple",
                        "--only", "qwen3/fastapi", "--no-smoke"]) == 2
    out = capsys.readouterr().out
    assert "PIP_INDEX_URL" in out and "s3cr3tpw" not in out


# ----------------------------------------------------------------------------- the built images

@pytest.mark.docker
def test_no_local_selfllm_image_ships_a_secret(docker_client):
    from selfllm_recipes.secret_scan import scan_image

    tags = sorted({tag for image in docker_client.images.list(filters={"reference": f"{IMAGE_PREFIX}/*"})
                   for tag in image.tags if tag.startswith(f"{IMAGE_PREFIX}/")})
    if not tags:
        missing_prerequisite(f"no local {IMAGE_PREFIX}/* image (build them: python scripts/build_matrix.py)")
    findings = {tag: [str(f) for f in scan_image(docker_client, tag)] for tag in tags}
    assert not {tag: found for tag, found in findings.items() if found}, findings
