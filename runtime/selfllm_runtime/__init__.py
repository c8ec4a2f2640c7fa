"""The in-image runtime shared by every recipe: one implementation per task kind.

Heavy imports (torch, transformers) stay inside functions so the host toolkit can import the
metadata schema without them.
"""
