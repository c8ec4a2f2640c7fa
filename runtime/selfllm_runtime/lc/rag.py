"""Retrieval-augmented generation over a folder of .txt/.md files.

load (DOCS_DIR) → split (RecursiveCharacterTextSplitter) → embed (sentence-transformers) →
Chroma persistent store → retrieve → prompt | chat model | StrOutputParser.

Chunk ids are derived from (file, offset, text), so indexing the same folder again upserts in
place, and chunks of files that changed or vanished are deleted: the store mirrors the folder.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough

log = logging.getLogger("selfllm.rag")

DOC_SUFFIXES = (".txt", ".md")
# Chinese sentence ends too, so Chinese documents split on sentences rather than mid-sentence.
SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", ". ", "! ", "? ", "; ", "，", ", ", " ", ""]

SYSTEM_PROMPT = """使用以下上下文来回答用户的问题。如果你不知道答案，就说你不知道，不要试图编造答案。尽量使答案简明扼要。
Use the context below to answer the user's question. If you don't know the answer, say so; don't make one up.

{context}"""


class SentenceTransformerEmbeddings(Embeddings):
    """LangChain Embeddings over sentence-transformers (a hub id or a local folder), L2-normalized."""

    def __init__(self, model_name_or_path: str, device: str | None = None, cache_folder: str | None = None,
                 batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.model_name = model_name_or_path
        self.batch_size = batch_size
        self.model = SentenceTransformer(model_name_or_path, device=device, cache_folder=cache_folder)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return vectors.tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def load_documents(folder: Path) -> list[Document]:
    """Every .txt/.md file under folder (recursive, sorted), metadata source = path relative to folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"documents folder {folder} does not exist")
    docs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append(Document(page_content=text, metadata={"source": path.relative_to(folder).as_posix()}))
    return docs


def split_documents(docs: list[Document], chunk_size: int = 500, chunk_overlap: int = 50) -> list[Document]:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                                              separators=SEPARATORS, add_start_index=True)
    return splitter.split_documents(docs)


def chunk_id(chunk: Document) -> str:
    key = f"{chunk.metadata.get('source')}\0{chunk.metadata.get('start_index')}\0{chunk.page_content}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def open_store(persist_dir: Path, embeddings: Embeddings, collection: str = "selfllm_rag"):
    """The Chroma collection persisted under persist_dir (created when missing); cosine distance."""
    import chromadb
    from langchain_chroma import Chroma

    persist_dir = Path(persist_dir)
    persist_dir.mkdir(parents=True, exist_ok=True)
    client = chromadb.PersistentClient(path=str(persist_dir),
                                       settings=chromadb.config.Settings(anonymized_telemetry=False))
    return Chroma(client=client, collection_name=collection, embedding_function=embeddings,
                  collection_metadata={"hnsw:space": "cosine"})


@dataclass(frozen=True)
class IndexStats:
    files: int
    chunks: int
    added: int
    removed: int


def sync_index(store, chunks: list[Document]) -> IndexStats:
    """Make the store hold exactly these chunks: add the new ones, delete the stale ones."""
    ids = [chunk_id(c) for c in chunks]
    unique = dict(zip(ids, chunks))
    existing = set(store.get(include=[])["ids"])
    new_ids = [i for i in unique if i not in existing]
    stale = sorted(existing - unique.keys())
    if stale:
        store.delete(ids=stale)
    if new_ids:
        store.add_documents([unique[i] for i in new_ids], ids=new_ids)
    files = len({c.metadata.get("source") for c in chunks})
    return IndexStats(files=files, chunks=len(unique), added=len(new_ids), removed=len(stale))


def format_docs(docs: Iterable[Document]) -> str:
    return "\n\n".join(f"[{d.metadata.get('source', '?')}]\n{d.page_content}" for d in docs)


def answer_chain(llm: BaseChatModel) -> Runnable:
    """{"context": str, "question": str} → answer text."""
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM_PROMPT), ("human", "{question}")])
    return prompt | llm | StrOutputParser()


def rag_chain(retriever: Runnable, llm: BaseChatModel) -> Runnable:
    """question → {"question", "docs", "answer"}: the sources come back with the answer."""
    answer = (RunnableLambda(lambda x: {"context": format_docs(x["docs"]), "question": x["question"]})
              | answer_chain(llm))
    return RunnableParallel(question=RunnablePassthrough(), docs=retriever).assign(answer=answer)


def describe_sources(docs: list[Document]) -> list[dict[str, Any]]:
    return [{"source": d.metadata.get("source"), "start_index": d.metadata.get("start_index"),
             "preview": d.page_content[:80]} for d in docs]
