"""The resume ledger: which blocks are finished, stored next to the output's data.

One empty marker file per finished block, written *after* the block's pixels. Zarr v3 does
not store chunks that equal the fill value, so chunk presence cannot tell a finished block
from an unstarted one: the ledger is the truth. Marker files need no locking and survive
any crash (a block either has its marker or is redone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quietscope.errors import OutputError

LEDGER_DIR = ".quietscope"


class Ledger:
    def __init__(self, output: str | Path) -> None:
        self.root = Path(output) / LEDGER_DIR
        self.done_dir = self.root / "done"

    def create(self, job: dict[str, Any]) -> None:
        self.done_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "job.json").write_text(json.dumps(job, indent=2, sort_keys=True, default=str))

    def job(self) -> dict[str, Any]:
        path = self.root / "job.json"
        if not path.exists():
            raise OutputError(f"{str(self.root.parent)!r} has no quietscope job record; it cannot be resumed, use --overwrite")
        return json.loads(path.read_text())

    def check_same_job(self, job: dict[str, Any]) -> None:
        old = self.job()
        keys = [k for k in job if k not in ("started", "complete")]
        diff = [k for k in keys if old.get(k) != json.loads(json.dumps(job[k], default=str))]
        if diff:
            raise OutputError(
                f"--resume: {str(self.root.parent)!r} was started with different settings ({', '.join(diff)}); "
                "use the same options or --overwrite"
            )

    def mark_done(self, key: str) -> None:
        marker = self.done_dir / key
        tmp = self.done_dir / f".{key}.tmp{os.getpid()}"
        tmp.write_bytes(b"")
        tmp.replace(marker)

    def done(self) -> set[str]:
        if not self.done_dir.exists():
            return set()
        return {p.name for p in self.done_dir.iterdir() if not p.name.startswith(".")}

    def set_complete(self, complete: bool = True) -> None:
        job = self.job()
        job["complete"] = complete
        (self.root / "job.json").write_text(json.dumps(job, indent=2, sort_keys=True, default=str))
