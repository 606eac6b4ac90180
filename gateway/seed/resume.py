"""The resume state of a seed: one small JSON file per set of seed parameters.

By default it lives in the cache's state directory as ``seed-<layer>-<digest>.json``, where
the digest hashes the plan's parameters (layer, its render fingerprint, box, zooms, formats,
scale), so running the same seed again continues where the last run stopped and a different
seed starts its own file. Content::

    {"version": 1, "params": {...}, "next_index": 120, "total": 4096, "updated": 1718000000.0}

Every tile before ``next_index`` in the plan order is done. The file is written atomically
(temporary file, then rename) and removed once the seed completes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gateway.seed.plan import SeedPlan

VERSION = 1


class ResumeError(Exception):
    """The state file cannot be used (unreadable, or written for other seed parameters)."""


class ResumeState:
    """The state file at ``path`` for a plan with parameters ``params``."""

    def __init__(self, path: Path, params: dict[str, Any]) -> None:
        self.path = path
        self.params = params

    @classmethod
    def for_plan(
        cls, plan: SeedPlan, state_directory: Path, path: Path | None = None
    ) -> ResumeState:
        """The state of ``plan``: at ``path`` if given, else in ``state_directory``."""
        if path is None:
            path = state_directory / f"seed-{plan.layer.name}-{plan.digest()}.json"
        return cls(path, plan.params())

    def load(self) -> int:
        """The index to resume at (0 without a file).

        Raises:
            ResumeError: the file is not a seed state, or belongs to other parameters.
        """
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise ResumeError(f"{self.path}: not a readable seed state ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ResumeError(f"{self.path}: not a seed state file (version {VERSION})")
        if data.get("params") != self.params:
            raise ResumeError(
                f"{self.path}: written by a seed with other parameters "
                f"({json.dumps(data.get('params'))}); remove it or pass another --state"
            )
        index = data.get("next_index")
        if not isinstance(index, int) or index < 0:
            raise ResumeError(f"{self.path}: next_index must be a non-negative integer")
        return index

    def save(self, next_index: int, total: int) -> None:
        """Record that every tile before ``next_index`` is done (atomic replace)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "version": VERSION,
            "params": self.params,
            "next_index": next_index,
            "total": total,
            "updated": time.time(),
        }
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(temporary, self.path)

    def remove(self) -> None:
        """Delete the file (the seed completed)."""
        self.path.unlink(missing_ok=True)
