"""The resume ledger: which blocks are finished, stored next to the output's data.

One empty marker file per finished block, written *after* the block's pixels. Zarr v3 does
not store chunks that equal the fill value, so chunk presence cannot tell a finished block
from an unstarted one: the ledger is the truth. Marker files need no locking and survive
any crash (a block either has its marker or is redone).

While a job runs the ledger is the folder ``.quietscope/`` inside the output. When the job is
complete its record moves into the output group's attributes (``quietscope_job``) and the
folder is removed: a finished output holds nothing but zarr nodes, so zarr lists it without
warnings ("object ... is not recognized as a component of a Zarr hierarchy").

While it runs, ``.quietscope/`` is itself marked as a (child) zarr group of the output's zarr
format, so listing the output's members is clean then too; it holds no arrays, so
``array_keys()`` names only the pyramid levels. Pyramid tiles written after level 0 have their
own markers in ``.quietscope/levels/`` (the block markers in ``done/`` stay level 0 only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from quietscope.errors import OutputError

LEDGER_DIR = ".quietscope"
#: Group attribute holding the job record of a finished job.
JOB_ATTR = "quietscope_job"
#: Folder (inside the ledger) of the markers of finished coarse pyramid tiles.
LEVELS_DIR = "levels"


class Ledger:
    def __init__(self, output: str | Path) -> None:
        self.root = Path(output) / LEDGER_DIR
        self.done_dir = self.root / "done"

    def create(self, job: dict[str, Any]) -> None:
        self.done_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "job.json").write_text(json.dumps(job, indent=2, sort_keys=True, default=str))
        self.mark_as_zarr_group()

    @property
    def levels_dir(self) -> Path:
        return self.root / LEVELS_DIR

    def mark_as_zarr_group(self) -> None:
        """Make the ledger folder a zarr group node of the output's format (clean listings).

        Written by hand (one small JSON file): ``zarr.open_group`` would also accept the
        folder, but this must not depend on zarr's handling of the marker files inside it.
        """
        parent = self.root.parent
        note = {"quietscope_ledger": "resume ledger of a running quietscope job; removed when the job completes"}
        if (parent / "zarr.json").exists():
            doc = {"zarr_format": 3, "node_type": "group", "attributes": note}
            (self.root / "zarr.json").write_text(json.dumps(doc))
        elif (parent / ".zgroup").exists():
            (self.root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
            (self.root / ".zattrs").write_text(json.dumps(note))

    def mark_tile_done(self, key: str) -> None:
        """Marker of a finished coarse pyramid tile (written after its pixels, like a block's)."""
        self.levels_dir.mkdir(parents=True, exist_ok=True)
        marker = self.levels_dir / key
        tmp = self.levels_dir / f".{key}.tmp{os.getpid()}"
        tmp.write_bytes(b"")
        tmp.replace(marker)

    def tiles_done(self) -> set[str]:
        if not self.levels_dir.exists():
            return set()
        return {p.name for p in self.levels_dir.iterdir() if not p.name.startswith(".")}

    def job(self) -> dict[str, Any]:
        path = self.root / "job.json"
        if path.exists():
            return json.loads(path.read_text())
        record = self._finished_record()
        if record is None:
            raise OutputError(f"{str(self.root.parent)!r} has no quietscope job record; it cannot be resumed, use --overwrite")
        return record

    def _finished_record(self) -> dict[str, Any] | None:
        import zarr

        try:
            record = zarr.open_group(str(self.root.parent), mode="r").attrs.get(JOB_ATTR)
        except Exception:  # not a zarr group at all: no record
            return None
        return dict(record) if isinstance(record, dict) else None

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

    def set_complete(self) -> None:
        """Move the job record into the group's attributes and remove the ledger folder."""
        import shutil

        import zarr

        job = self.job()
        job["complete"] = True
        zarr.open_group(str(self.root.parent), mode="r+").attrs[JOB_ATTR] = json.loads(json.dumps(job, default=str))
        shutil.rmtree(self.root, ignore_errors=True)
