"""Where an export is written: check the destination first, stage the files, then commit or roll back.

A folder export is staged in a temporary folder beside it and renamed into place in one step, so a
failed export leaves nothing behind and a reader never sees half a folder.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> dest = prepare(root / "out")
    >>> _ = (dest.staging / "model.onnx").write_bytes(b"onnx")
    >>> commit(dest, ["model.onnx"]); sorted(p.name for p in (root / "out").iterdir())
    ['model.onnx']
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from surgeon.core.errors import ExportError
from surgeon.export.manifest import MANIFEST_NAME

__all__ = ["Destination", "prepare", "commit", "rollback"]


@dataclass
class Destination:
    final_dir: Path          # folder the files end up in
    onnx_name: str
    manifest_name: str
    dir_mode: bool           # True: `path` is a folder we own (model.onnx + manifest.json)
    staging: Path            # temp folder inside final_dir's parent (or final_dir for file mode)
    created: list[Path]      # folders we made, deepest last (removed again on failure)


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _unwritable(path: Path, why: str) -> ExportError:
    return ExportError(
        f"cannot write the ONNX export to {path}: {why}. Nothing was exported. Pass a folder "
        "(or a path ending in .onnx) inside a directory you can write to.")


def prepare(path: Path) -> Destination:
    """Check the destination and create the staging folder, before any expensive work."""
    dir_mode = path.suffix.lower() != ".onnx"
    if dir_mode:
        final_dir, onnx_name, manifest_name = path, "model.onnx", MANIFEST_NAME
        if path.exists() and not path.is_dir():
            raise _unwritable(path, "it exists and is a file, not a folder")
        staging_parent = path.parent
    else:
        final_dir, onnx_name = path.parent, path.name
        manifest_name = f"{path.stem}.manifest.json"
        if path.is_dir():
            raise _unwritable(path, "it exists and is a folder, not a file")
        staging_parent = final_dir
    existing = _first_existing(staging_parent)
    if not existing.is_dir():
        raise _unwritable(path, f"{existing} is a regular file, not a folder; remove it or "
                                "choose another path")
    created: list[Path] = []
    try:
        missing = []
        p = staging_parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=staging_parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; it may become the export folder
    except OSError as e:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise _unwritable(path, f"{e.strerror or e} ({e.filename or staging_parent})") from e
    return Destination(final_dir, onnx_name, manifest_name, dir_mode, staging, created)


def commit(dest: Destination, files: list[str]) -> None:
    """Move the staged files into place (a fresh folder is renamed in one step)."""
    if dest.dir_mode and not dest.final_dir.exists():
        os.replace(dest.staging, dest.final_dir)
        return
    dest.final_dir.mkdir(parents=True, exist_ok=True)
    for name in files:
        os.replace(dest.staging / name, dest.final_dir / name)
    shutil.rmtree(dest.staging, ignore_errors=True)


def rollback(dest: Destination) -> None:
    """Remove the staging folder and the folders :func:`prepare` created."""
    shutil.rmtree(dest.staging, ignore_errors=True)
    for d in reversed(dest.created):
        with contextlib.suppress(OSError):
            d.rmdir()
