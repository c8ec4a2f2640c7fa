"""LangChain integration of the shared ChatEngine: a chat model class and a small RAG pipeline."""
