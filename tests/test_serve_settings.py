"""Serving a checkpoint natively (issue 20): CHAT_TEMPLATE, the served model name, PORT and TORCH_THREADS,
on the tiny models, on CPU."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from selfllm_recipes.layout import RECIPES_DIR
from selfllm_runtime import cli
from selfllm_runtime.settings import SettingsError

HELLO = [{"role": "user", "content": "Hello"}]
URL = "/v1/chat/completions"


def without_template(folder: Path, out: Path) -> Path:
    """A copy of a model folder whose tokenizer has no chat template (no chat_template.jinja, no key)."""
    shutil.copytree(folder, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def bare_model(tiny_recipe, tmp_path_factory) -> Path:
    return without_template(tiny_recipe("qwen3/fastapi")[1], tmp_path_factory.mktemp("bare") / "my-checkpoint")


def app_for(context, model_dir: Path, env: dict[str, str]):
    from selfllm_runtime.chat_engine import ChatEngine
    from selfllm_runtime.settings import FastapiSettings
    from selfllm_runtime.tasks.fastapi_server import create_app

    settings = context.settings(FastapiSettings, env={"MODEL_PATH": str(model_dir), "TORCH_THREADS": "1", **env})
    engine = ChatEngine(context, model_dir, settings)
    return engine, create_app(engine, settings)


# ----------------------------------------------------------------------------- CHAT_TEMPLATE

def test_a_checkpoint_without_a_chat_template_is_served_with_the_familys(tiny_recipe, bare_model, caplog):
    context = tiny_recipe("qwen3/fastapi")[0]
    caplog.set_level("INFO", logger="selfllm.chat")
    engine, app = app_for(context, bare_model, {})
    family_file = str(context.family_dir / context.family.chat_template)
    with TestClient(app) as client:
        health = client.get("/health").json()
        assert health["chat_template"] == {"source": "family", "file": family_file}
        answer = client.post(URL, json={"messages": HELLO, "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        legacy = client.post("/", json={"prompt": "Hello", "max_length": 4})
        assert legacy.status_code == 200, legacy.text
    assert engine.format_prompt(HELLO).endswith("<|im_start|>assistant\n")
    start = [r.getMessage() for r in caplog.records if "chat template:" in r.getMessage()]
    assert start and f"chat template: family ({family_file})" in start[-1] and "torch threads" in start[-1]


def test_the_checkpoints_own_template_is_used_and_named(tiny_recipe):
    context, folder = tiny_recipe("qwen3/fastapi")
    engine, app = app_for(context, folder, {})
    with TestClient(app) as client:
        assert client.get("/health").json()["chat_template"] == {
            "source": "checkpoint", "file": str(folder / "chat_template.jinja")}


def test_chat_template_checkpoint_refuses_a_checkpoint_without_one(tiny_recipe, bare_model):
    from selfllm_runtime.chat_engine import ChatEngine

    context = tiny_recipe("qwen3/fastapi")[0]
    settings = context.settings(env={"CHAT_TEMPLATE": "checkpoint"})
    with pytest.raises(SettingsError, match=r"^CHAT_TEMPLATE=checkpoint: .*my-checkpoint ships no chat template"):
        ChatEngine(context, bare_model, settings)


def test_selfllm_start_refuses_chat_template_checkpoint_in_one_line(bare_model, monkeypatch, capsys):
    started = []
    monkeypatch.setattr("selfllm_runtime.tasks.fastapi_server.run", lambda *a: started.append(a))
    monkeypatch.setenv("MODEL_PATH", str(bare_model))
    monkeypatch.setenv("CHAT_TEMPLATE", "checkpoint")
    monkeypatch.setenv("HOST", "127.0.0.1")
    monkeypatch.setenv("PORT", str(free_port()))
    assert cli.main(["start", "--recipe", str(RECIPES_DIR / "qwen3" / "fastapi")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfllm: error: CHAT_TEMPLATE=checkpoint: "), err
    assert not started  # refused before the model was loaded


def with_template_file(tiny_recipe, model_dir: Path, file: Path, text: str):
    """(engine, app, file) of the tiny Qwen3 served with CHAT_TEMPLATE=file, which holds text."""
    file.write_text(text, encoding="utf-8")
    return (*app_for(tiny_recipe("qwen3/fastapi")[0], model_dir, {"CHAT_TEMPLATE": str(file)}), file)


def test_chat_template_file_is_used(tiny_recipe, bare_model, tmp_path):
    engine, app, mine = with_template_file(
        tiny_recipe, bare_model, tmp_path / "plain.jinja",
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}")
    assert engine.format_prompt(HELLO) == "[user] Hello\n[assistant] "
    with TestClient(app) as client:
        assert client.get("/health").json()["chat_template"] == {"source": "file", "file": str(mine)}
        assert client.post(URL, json={"messages": HELLO, "max_tokens": 2}).status_code == 200
    # family wins over the checkpoint's own when asked
    family, _ = app_for(tiny_recipe("qwen3/fastapi")[0], tiny_recipe("qwen3/fastapi")[1], {"CHAT_TEMPLATE": "family"})
    assert family.chat_template.source == "family"


@pytest.mark.parametrize(("value", "message"), [
    ("/no/such/template.jinja", r"^CHAT_TEMPLATE='/no/such/template.jinja': no such file"),
    ("", None)])  # empty: unset, the default
def test_a_missing_template_file_is_named(tiny_recipe, value, message):
    context = tiny_recipe("qwen3/fastapi")[0]
    if message is None:
        assert context.settings(env={"CHAT_TEMPLATE": value}).chat_template == "auto"
        return
    with pytest.raises(SettingsError, match=message):
        context.settings(env={"CHAT_TEMPLATE": value})


def test_the_same_choice_for_lora_data(bare_model):
    from selfllm_runtime.context import load_context
    from selfllm_runtime.finetune.lora import load_tokenizer

    context = load_context(RECIPES_DIR / "qwen3" / "lora")
    tokenizer = load_tokenizer(context, bare_model, "auto")
    assert tokenizer.chat_template == context.chat_template
    with pytest.raises(SettingsError, match="CHAT_TEMPLATE=checkpoint"):
        load_tokenizer(context, bare_model, "checkpoint")


def test_a_template_that_refuses_the_messages_is_the_clients_400(tiny_recipe, bare_model, tmp_path):
    _, app, _ = with_template_file(tiny_recipe, bare_model, tmp_path / "strict.jinja",
                                   "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}"
                                   "{{ messages[0]['content'] }}")
    two = [*HELLO, {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post(URL, json={"messages": two, "max_tokens": 2})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "messages", error
        assert error["code"] == "chat_template_refused" and "chat template (file) refuses" in error["message"]
        assert "only one message" in error["message"]
        legacy = client.post("/", json={"prompt": "x", "history": [["a", "b"]]})
        assert legacy.status_code == 400 and "only one message" in legacy.json()["detail"], legacy.text
        assert client.post(URL, json={"messages": HELLO, "max_tokens": 2}).status_code == 200


def test_a_broken_template_is_the_servers_500_not_the_clients_400(tiny_recipe, bare_model, tmp_path):
    _, app, _ = with_template_file(tiny_recipe, bare_model, tmp_path / "broken.jinja",
                                   "{% if messages|length > 1 %}{{ messages[0].content.nope() }}{% endif %}"
                                   "{{ messages[0]['content'] }}")
    two = [*HELLO, {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post(URL, json={"messages": two, "max_tokens": 2})
        assert answer.status_code == 500, answer.text
        error = answer.json()["error"]
        assert error["type"] == "server_error" and "chat template (file) could not render" in error["message"]
        assert client.post("/", json={"prompt": "x", "history": [["a", "b"]]}).status_code == 500


# ----------------------------------------------------------------------------- served names

def test_models_lists_the_mounted_checkpoints_name_and_takes_the_aliases(tiny_recipe, bare_model):
    context = tiny_recipe("qwen3/fastapi")[0]
    _, app = app_for(context, bare_model, {})
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["my-checkpoint"]
        for name in ("my-checkpoint", "Qwen/Qwen3-8B", "Qwen3-8B"):
            answer = client.post(URL, json={"model": name, "messages": HELLO, "max_tokens": 2})
            assert answer.status_code == 200 and answer.json()["model"] == name, answer.text
        assert client.post(URL, json={"model": "gpt-4", "messages": HELLO}).status_code == 404


def test_model_id_and_served_model_name(tiny_recipe):
    from selfllm_runtime.model_source import served_names

    context = tiny_recipe("llama3.1/fastapi")[0]
    names = served_names(context.recipe, context.family, context.settings(env={"MODEL_ID": "org/My-Llama"}))
    assert names == ["org/My-Llama", "My-Llama", "LLM-Research/Meta-Llama-3.1-8B-Instruct",
                     "meta-llama/Llama-3.1-8B-Instruct", "Meta-Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"]
    settings = context.settings(env={"MODEL_ID": "org/My-Llama", "SERVED_MODEL_NAME": " mine "})
    assert served_names(context.recipe, context.family, settings, settings.served_model_name) == ["mine"]
    folder = tiny_recipe("llama3.1/fastapi")[1]
    _, app = app_for(context, folder, {"SERVED_MODEL_NAME": "mine"})
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["mine"]
        assert client.post(URL, json={"model": "Llama-3.1-8B-Instruct", "messages": HELLO}).status_code == 404


# ----------------------------------------------------------------------------- PORT, side by side

def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_env(recipe: str, model_dir: Path, port: int) -> dict[str, str]:
    import selfllm_runtime

    runtime = str(Path(selfllm_runtime.__file__).parents[1])
    return {**os.environ, "RECIPE_DIR": str(RECIPES_DIR / recipe), "MODEL_PATH": str(model_dir), "HOST": "127.0.0.1",
            "PORT": str(port), "HF_HUB_OFFLINE": "1", "TORCH_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [runtime, os.environ.get("PYTHONPATH")]))}


def get_json(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())


def test_two_recipes_serve_side_by_side_on_their_ports_and_a_taken_port_is_refused(tiny_recipe, tmp_path):
    recipes = {"qwen3/fastapi": free_port(), "llama3.1/fastapi": free_port()}
    logs = {recipe: tmp_path / f"{recipe.replace('/', '-')}.log" for recipe in recipes}
    servers = {recipe: subprocess.Popen([sys.executable, "-m", "selfllm_runtime", "start"],
                                        env=start_env(recipe, tiny_recipe(recipe)[1], port),
                                        stdout=subprocess.DEVNULL, stderr=logs[recipe].open("w"))
               for recipe, port in recipes.items()}
    try:
        deadline = time.monotonic() + 240
        for recipe, port in recipes.items():
            while True:
                assert servers[recipe].poll() is None, logs[recipe].read_text()
                try:
                    health = get_json(f"http://127.0.0.1:{port}/health")
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"{recipe} did not answer on {port}"
                    time.sleep(0.5)
            assert health["status"] == "ok" and health["chat_template"]["source"] == "checkpoint"
            answer = get_json(f"http://127.0.0.1:{port}/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
            assert answer["model"] == "smoke-model" and answer["choices"], answer
            start = logs[recipe].read_text()
            assert "torch threads (TORCH_THREADS=1)" in start and "chat template: checkpoint (" in start
        # the port qwen3 holds: one line naming PORT, exit 2, before the model is loaded
        taken = recipes["qwen3/fastapi"]
        done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "start"], capture_output=True, text=True,
                              env=start_env("llama3.1/fastapi", tiny_recipe("llama3.1/fastapi")[1], taken),
                              timeout=120)
        assert done.returncode == 2, done.stderr
        # the start's one INFO line naming the build it runs in (metadata.build_line), then the refusal in one line
        info, *errors = done.stderr.strip().splitlines()
        assert " INFO selfllm: llama3.1/fastapi, default build " in info, done.stderr
        assert len(errors) == 1 and errors[0].startswith(f"selfllm: error: PORT={taken}: can't listen on 127.0.0.1:"), errors
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(30)


@pytest.mark.parametrize("task", ["fastapi", "webdemo", "vllm"])
@pytest.mark.parametrize(("value", "problem"), [("0", "greater than or equal to 1"), ("65536", "less than or equal"),
                                                ("http", "valid integer")])
def test_a_bad_port_is_named_in_one_line(task, value, problem, monkeypatch, capsys):
    monkeypatch.setattr(cli, "resolve_model", lambda request: pytest.fail("fetched before PORT was checked"))
    monkeypatch.setenv("PORT", value)
    assert cli.main(["start", "--recipe", str(RECIPES_DIR / "qwen3" / task)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"selfllm: error: PORT={value!r}: ") and problem in err[0], err


def test_port_reaches_the_webdemo_and_the_health_probe(tiny_recipe, monkeypatch):
    from selfllm_runtime.tasks.webdemo import streamlit_command

    context = tiny_recipe("qwen3/webdemo")[0]
    command = streamlit_command(context, context.settings(env={"PORT": "7001", "HOST": "127.0.0.1"}))
    assert command[command.index("--server.port") + 1] == "7001"
    asked = []

    class Answer:
        status = 200

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cli.urllib.request, "urlopen", lambda url, timeout: asked.append(url) or Answer())
    monkeypatch.setenv("PORT", "7001")
    assert cli.main(["health", "--recipe", str(RECIPES_DIR / "qwen3" / "fastapi")]) == 0
    assert asked == ["http://127.0.0.1:7001/health"]


# ----------------------------------------------------------------------------- TORCH_THREADS

def test_torch_threads_auto_counts_idle_physical_cores(monkeypatch):
    from selfllm_runtime import loading

    two_cores_four_threads = "".join(f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i % 2}\n\n" for i in range(4))
    assert loading.physical_cores(two_cores_four_threads) == 2
    monkeypatch.setattr(loading, "physical_cores", lambda: 8)
    monkeypatch.setattr(loading, "usable_cpus", lambda: 6)
    assert loading.torch_threads("auto", load=0.3)[0] == 6  # capped by affinity / quota
    assert loading.torch_threads("auto", load=2.7)[0] == 4  # two cores busy elsewhere
    assert loading.torch_threads("auto", load=40.0)[0] == 1
    assert loading.torch_threads("3", load=40.0) == (3, "TORCH_THREADS=3")


def test_cgroup_quota_caps_usable_cpus(tmp_path):
    from selfllm_runtime.loading import usable_cpus

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path / "cpu.max") == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path / "cpu.max") == usable_cpus(tmp_path / "missing")


@pytest.mark.parametrize("task", ["fastapi", "webdemo", "langchain", "lora"])
def test_a_bad_torch_threads_is_named(task, monkeypatch, capsys):
    monkeypatch.setattr(cli, "resolve_model", lambda request: pytest.fail("fetched before the settings were checked"))
    monkeypatch.setenv("TORCH_THREADS", "0")
    assert cli.main(["start", "--recipe", str(RECIPES_DIR / "qwen3" / task)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfllm: error: TORCH_THREADS='0': "), err


def test_torch_threads_setting_is_applied(tiny_recipe):
    import torch

    before = torch.get_num_threads()
    try:
        engine, _ = app_for(tiny_recipe("qwen3/fastapi")[0], tiny_recipe("qwen3/fastapi")[1], {"TORCH_THREADS": "1"})
        assert torch.get_num_threads() == 1 and engine.threads.startswith("1 torch threads (TORCH_THREADS=1)")
    finally:
        torch.set_num_threads(before)
