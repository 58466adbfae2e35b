"""Policy revisions: every set that was enforced is kept (the last N) so it can be restored.

A revision is the content hash of the schema (with the part generated from the
connectors), the policy files and the entities. Rollback writes the stored
files back into the policy directory (each file replaced atomically; policy
files that the revision did not have are removed) and reloads, exactly as if
an operator had checked the old files out: the directory stays the source of
truth, and the file watcher sees nothing unusual.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from ..store import PolicyRevision, Store
from .engine import PolicyBundle, PolicySource

log = logging.getLogger("proctor.policy")

KEEP_REVISIONS = 20


async def record_revision(store: Store, bundle: PolicyBundle, keep: int = KEEP_REVISIONS) -> None:
    await store.save_revision(
        PolicyRevision(revision=bundle.revision, loaded_at=bundle.loaded_at, files=dict(bundle.sources)), keep=keep
    )


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def restore_files(source: PolicySource, files: dict[str, str]) -> list[str]:
    """Write a revision's files back; returns what changed. Raises OSError (e.g. a read-only directory)."""
    targets: dict[Path, str] = {}
    for name, text in files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ValueError(f"refusing to restore a file named {name!r}")
        if name == source.schema_path.name:
            targets[source.schema_path] = text
        elif source.entities_path is not None and name == source.entities_path.name:
            targets[source.entities_path] = text
        elif name.endswith(".cedar"):
            targets[source.policy_dir / name] = text
        else:
            raise ValueError(f"refusing to restore an unexpected file {name!r}")
    changed = []
    for path, text in targets.items():
        try:
            if path.read_text() == text:
                continue
        except OSError:
            pass
        _atomic_write(path, text)
        changed.append(path.name)
    for extra in sorted(source.policy_dir.glob("*.cedar")):
        if extra not in targets:
            extra.unlink()
            changed.append(f"-{extra.name}")
    if source.entities_path is not None and source.entities_path not in targets and source.entities_path.exists():
        source.entities_path.unlink()  # the revision had no entities file
        changed.append(f"-{source.entities_path.name}")
    return changed
