"""Stage records: a stage is done exactly when its record (`<run_dir>/<stage>/MANIFEST.json`) exists.

Each stage writes its artifacts first and its record last (atomically): what it consumed, with
hashes; what it produced, with hashes; the resolved config; the code revision. The launcher skips
stages whose record exists (`RunLayout.is_done`). Not to be confused with a dataset's
`manifest.json`, the index of its shards (`data.shardformat`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from typing import Any

from tsvae_dist import storage
from tsvae_dist.config import RunConfig, to_container
from tsvae_dist.layout import RunLayout


def read(layout: RunLayout, stage: str) -> dict[str, Any]:
    return json.loads(storage.read_text(layout.record(stage)))


def sha256_of(url: str) -> str:
    return hashlib.sha256(storage.read_bytes(url)).hexdigest()


def artifact(url: str) -> dict[str, str]:
    """A record's entry for one file: its URL and SHA-256."""
    return {"url": url, "sha256": sha256_of(url)}


def code_revision() -> str:
    """The git revision of the code (with '-dirty' for uncommitted changes), or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write(cfg: RunConfig, stage: str, consumed: dict[str, Any], produced: dict[str, Any],
          extra: dict[str, Any] | None = None) -> str:
    """Commit a stage: write its record (last, atomically)."""
    url = cfg.layout.record(stage)
    body = {
        "stage": stage,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_revision": code_revision(),
        "consumed": consumed,
        "produced": produced,
        "config": to_container(cfg),
        **(extra or {}),
    }
    storage.write_text_atomic(url, json.dumps(body, indent=2, sort_keys=True) + "\n")
    return url
