#!/usr/bin/env python3
"""Matrix builder CLI (thin wrapper): see selfllm_recipes/cli.py or `--help`."""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "runtime")]

from selfllm_recipes.cli import main  # noqa: E402

sys.exit(main())
