"""Smoke-test: run each recipe image in a container (testcontainers) and exercise its task the
way a user's client would. One check per task kind, shared by every model."""
