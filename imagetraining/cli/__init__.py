"""The `imagetraining` console script (`imagetraining.cli:main`); see `imagetraining.cli.app`."""

from __future__ import annotations

from imagetraining.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
