"""Turn this machine's pip settings into a pip.conf for the image build (container/test.sh).

Reads ``python -m pip config list`` (files and ``PIP_*`` variables, variables winning) and
writes one ``[global]`` section for the build's ``pipconf`` secret:

- local folders and ``file://`` indexes (``find-links``, ``index-url``, ``extra-index-url``)
  are rewritten under ``/pipfiles``, where the Containerfile mounts the ``pipfiles`` build
  context read-only; that context is their common parent folder, printed on stdout;
- ``cert`` points at the ``pipcert`` secret (``/run/secrets/pipcert``); the host's file is
  printed on stdout;
- ``constraint`` and ``requirement`` files are left out (the Containerfile pins torch itself).

Usage: ``python container/pip_settings.py OUT_PIP_CONF`` prints two lines,
``pipfiles=DIR`` (empty when no local path is used) and ``pipcert=FILE`` (empty when none).
"""

from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path

MOUNT = "/pipfiles"
CERT = "/run/secrets/pipcert"
LOCATION_KEYS = ("find-links", "index-url", "extra-index-url")
DROPPED = ("constraint", "requirement", "cache-dir", "log", "target", "prefix", "user")


def pip_settings() -> dict[str, str]:
    """Pip's effective settings as ``{key: value}`` (files in pip's order, then variables)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True,
                         capture_output=True, text=True).stdout
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        name, _, raw = line.partition("=")
        section, _, key = name.rpartition(".")
        value = ast.literal_eval(raw)
        if section == ":env:":
            env[key] = value
        elif section in ("global", "install", "download"):
            files[key] = value
    return {**files, **env}


def local_path(entry: str) -> str | None:
    """The local file-system path of a location (a folder or ``file://`` URL), else None."""
    if entry.startswith("file://"):
        return entry[len("file://"):]
    if "://" not in entry and entry.startswith("/"):
        return entry
    return None


def main(out_conf: str) -> None:
    """Write the build's pip.conf and print the pipfiles folder and the CA bundle."""
    settings = pip_settings()
    paths = [p for key in LOCATION_KEYS for e in settings.get(key, "").split()
             if (p := local_path(e)) and os.path.exists(p)]
    root = os.path.commonpath([os.path.realpath(p) for p in paths]) if paths else ""
    if root and os.path.isfile(root):
        root = os.path.dirname(root)

    def moved(entry: str) -> str:
        p = local_path(entry)
        if p is None:
            return entry
        if not os.path.exists(p):
            return ""
        inner = f"{MOUNT}/{os.path.relpath(os.path.realpath(p), root)}"
        return f"file://{inner}" if entry.startswith("file://") else inner

    conf = configparser.ConfigParser(interpolation=None)
    conf["global"] = {}
    for key, value in settings.items():
        if key in DROPPED:
            continue
        if key in LOCATION_KEYS:
            value = " ".join(m for e in value.split() if (m := moved(e)))
        elif key == "cert":
            value = CERT
        if value:
            conf["global"][key] = value
    with open(out_conf, "w") as fh:
        conf.write(fh)
    cert = settings.get("cert", "")
    print(f"pipfiles={root}")
    print(f"pipcert={cert if cert and Path(cert).is_file() else ''}")


if __name__ == "__main__":
    main(sys.argv[1])
