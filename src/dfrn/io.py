"""Atomic file writes and safe identifiers.

Every file dfrn writes goes to a temporary name in the same folder and is then renamed
into place with :func:`os.replace`, so an interrupted run never leaves a half-written
result that a later run could mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd

from dfrn.errors import DfrnInputError

__all__ = [
    "SAFE_ID",
    "check_safe_id",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_tsv",
    "atomic_write_nifti",
    "file_digest",
]

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


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name.split('.')[0]}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_tsv(df: pd.DataFrame, path: str | Path, index: bool = False) -> Path:
    return atomic_write(path, lambda p: df.to_csv(p, sep="\t", index=index, float_format="%.8g"))


def atomic_write_nifti(img: nib.Nifti1Image, path: str | Path) -> Path:
    return atomic_write(path, lambda p: nib.save(img, p))


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
