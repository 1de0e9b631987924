"""Running the real `perf_analyzer` (from `tritonclient[all]==2.51.0`) against the ensemble.

The wheel's binary needs `libb64.so.0d` and `libcudart.so.12` even for CPU-only runs. The
`nvidia-pytriton` wheel already carries both under hashed names, so a directory of links to
them on `LD_LIBRARY_PATH` is all it takes; no system packages.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..launcher.errors import LauncherError
from ..launcher.triton_install import TritonInstall


def perf_analyzer_binary() -> Path:
    found = shutil.which("perf_analyzer") or str(Path(sys.executable).parent / "perf_analyzer")
    if not Path(found).is_file():
        raise LauncherError("perf_analyzer not found: `pip install 'tritonclient[all]==2.51.0'`")
    return Path(found)


def perf_analyzer_environment(link_dir: Path) -> dict[str, str]:
    """Environment in which perf_analyzer finds its shared libraries (links made in link_dir)."""
    libs = TritonInstall.find().libs
    link_dir.mkdir(parents=True, exist_ok=True)
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.12*", "libcudart.so.12")):
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise LauncherError(f"{libs} has no {pattern}; reinstall nvidia-pytriton==0.7.0")
        link = link_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(matches[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(link_dir), env.get("LD_LIBRARY_PATH")]))
    return env


def write_input_data(path: Path, requests: Iterable[tuple[str, Sequence[str]]]) -> Path:
    """perf_analyzer `--input-data` JSON: one entry per (query, documents) request."""
    data = [
        {"QUERY": [query], "DOCUMENTS": {"content": list(documents), "shape": [len(documents)]}}
        for query, documents in requests
    ]
    path.write_text(json.dumps({"data": data}))
    return path
