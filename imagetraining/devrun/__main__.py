"""`python -m imagetraining.devrun` (what `make run` runs); see `imagetraining.devrun.app`."""

from __future__ import annotations

from imagetraining.devrun.app import main

if __name__ == "__main__":
    raise SystemExit(main())
