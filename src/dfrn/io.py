"""Atomic file writes and safe identifiers.

Every file dfrn writes goes to a temporary name in the same folder and is then renamed
into place with :func:`os.replace`, so an interrupted run never leaves a half-written
result that a later run could mistake for a finished one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd

from dfrn.errors import DfrnInputError, DiskSpaceError

__all__ = [
    "SAFE_ID",
    "check_safe_id",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_tsv",
    "atomic_write_nifti",
    "file_digest",
    "make_temp_dir",
    "umask_mode",
    "write_manifest",
    "verify_manifest",
    "MANIFEST_NAME",
]

MANIFEST_NAME = "manifest.json"
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_safe_id(value: str, what: str = "participant_id") -> str:
    """Return ``value`` if it is safe inside a file name, else raise a one-line error.

    Allowed: letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, no
    ``..``, at most 128 characters. This rules out path separators and traversal.
    """
    text = str(value)
    if not SAFE_ID.match(text) or ".." in text:
        raise DfrnInputError(
            f"{what} {text!r} is unsafe as a file name: use letters, digits, '.', '_' and '-' "
            "only, starting with a letter or digit, without '..' or path separators"
        )
    return text


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process's umask applied, as ``open``/``mkdir`` would apply it."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _is_no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    text = str(exc)
    # torch.save reports a full disk as RuntimeError("... file write failed") and similar
    return isinstance(exc, RuntimeError) and (
        "No space left" in text or "file write failed" in text or "Disk quota" in text
    )


def _no_space_error(path: Path, needed: int | None, written: int) -> DiskSpaceError:
    free = _free_bytes(path.parent)
    need = f"about {_human(needed)}" if needed else f"more than the {_human(written)} written"
    have = f"{_human(free)} free" if free is not None else "the free space is unknown"
    return DiskSpaceError(
        errno.ENOSPC,
        f"no space left on the device writing {path}: it needs {need}, {have} on "
        f"{path.parent}; free some space and rerun the same command to resume",
    )


def atomic_write(
    path: str | Path, write: Callable[[Path], None], size_hint: int | None = None
) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask), not
    ``mkstemp``'s 0600, so colleagues in the group can read results.

    Parameters
    ----------
    path : str or Path
        The final file.
    write : callable
        Writes the content to the temporary path it is given.
    size_hint : int, optional
        Expected size in bytes. When the disk has less free space, a
        :class:`~dfrn.errors.DiskSpaceError` is raised before anything is written.

    Raises
    ------
    DiskSpaceError
        When the disk is (or would be) full; the message names the file and the space needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size_hint:
        free = _free_bytes(path.parent)
        if free is not None and free < size_hint:
            raise _no_space_error(path, size_hint, 0)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, umask_mode(0o666))
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as exc:
        written = tmp_path.stat().st_size if tmp_path.exists() else 0
        # torch.save reports a full disk as an opaque stream error: look at the disk itself
        free_at_failure = _free_bytes(path.parent) if isinstance(exc, RuntimeError) else None
        tmp_path.unlink(missing_ok=True)
        full = _is_no_space(exc) or (free_at_failure is not None and free_at_failure < (1 << 20))
        if full and not isinstance(exc, DiskSpaceError):
            raise _no_space_error(path, size_hint, written) from exc
        raise
    return path


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new hidden temporary folder ``parent/.<prefix>.XXXX.tmp``, with umask permissions."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, umask_mode(0o777))
    return tmp


def place_folder(tmp: str | Path, final: str | Path) -> Path:
    """Rename a complete temporary folder into ``final``, replacing what was there.

    Used for folders that are written whole and then published (model packages, region
    ablation tasks); ``tmp`` must come from :func:`make_temp_dir` beside ``final``.
    """
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_tsv(
    df: pd.DataFrame, path: str | Path, index: bool = False, float_format: str | None = "%.8g"
) -> Path:
    """Write a TSV atomically; ``float_format=None`` keeps full precision."""
    return atomic_write(
        path, lambda p: df.to_csv(p, sep="\t", index=index, float_format=float_format)
    )


def atomic_write_nifti(img: nib.Nifti1Image, path: str | Path) -> Path:
    return atomic_write(path, lambda p: nib.save(img, p))


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(
    folder: str | Path, exclude: tuple[str, ...] = (), recursive: bool = False
) -> dict[str, Any]:
    """Write ``folder/manifest.json``: name, size and SHA-256 of every file in ``folder``.

    Sub-folders are not allowed (a task folder is flat) unless ``recursive``: then files in
    sub-folders are listed by their POSIX path relative to ``folder``. Returns the manifest.
    """
    folder = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    entries = sorted(folder.rglob("*")) if recursive else sorted(folder.iterdir())
    for p in entries:
        name = p.relative_to(folder).as_posix()
        if name == MANIFEST_NAME or p.name in exclude:
            continue
        if recursive and p.is_dir():
            continue
        if not p.is_file():
            raise ValueError(f"manifest: {p} is not a plain file")
        files[name] = {"size": p.stat().st_size, "sha256": file_digest(p)}
    manifest = {"version": 1, "files": files}
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def verify_manifest(folder: str | Path, required: tuple[str, ...] = ()) -> str | None:
    """Check ``folder`` against its manifest; return None when intact, else the reason.

    A folder fails when its manifest is missing or unreadable, when a listed file is missing
    or has another size or SHA-256, or when a ``required`` file is not listed.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return f"no {MANIFEST_NAME}"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        assert isinstance(files, dict)
    except Exception:
        return f"{MANIFEST_NAME} is unreadable"
    for name in required:
        if name not in files:
            return f"{name} is not in the manifest"
    for name, entry in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != entry.get("size"):
            return f"{name} has changed (size {p.stat().st_size}, expected {entry.get('size')})"
        if file_digest(p) != entry.get("sha256"):
            return f"{name} has changed (SHA-256 differs from the manifest)"
    return None
