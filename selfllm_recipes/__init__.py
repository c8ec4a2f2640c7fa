"""Host toolkit of self-llm recipes: discover → plan → build → smoke-test → report."""
