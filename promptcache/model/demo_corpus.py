"""The demo model's text: the Python standard library's own sources, which every machine has.

The shipped tokenizer was trained on the top-level modules (``Lib/*.py``); the demo model trains on
those plus a few packages, and is measured on packages neither saw (``HELD_OUT``). The split is by
package name, so it holds on any Python version: a file in a held-out package was never trained on.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

TRAIN_PACKAGES = (
    "asyncio", "collections", "concurrent", "ctypes", "dbm", "html", "importlib", "multiprocessing",
    "re", "sqlite3", "tomllib", "unittest", "venv", "wsgiref", "xmlrpc", "zoneinfo",
)
HELD_OUT = ("email", "http", "json", "logging", "urllib", "xml")
_SKIP_PARTS = {"test", "tests"}  # test suites are mostly data; not part of either split


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(packages: tuple[str, ...]) -> list[Path]:
    root = stdlib()
    out: list[Path] = []
    for pkg in packages:
        out += [p for p in (root / pkg).rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts)]
    return sorted(out)


def train_files() -> list[Path]:
    return sorted(stdlib().glob("*.py")) + _files(TRAIN_PACKAGES)


def held_out_files() -> list[Path]:
    return _files(HELD_OUT)


def _chunk(path: Path, nbytes: int) -> str:
    """``nbytes`` or fewer of ``path`` from the first line start after a third of it, whole lines."""
    text = path.read_text(encoding="utf-8", errors="replace")
    start = text.find("\n", len(text) // 3) + 1
    out = text[start:start + nbytes]
    return out[: out.rfind("\n") + 1] or out


def held_out_sample(n_files: int = 12, nbytes: int = 1500) -> list[str]:
    """A small fixed sample of held-out text: ``n_files`` files spread over the held-out list."""
    files = held_out_files()
    step = max(1, len(files) // n_files)
    return [c for c in (_chunk(p, nbytes) for p in files[::step][:n_files]) if c.strip()]
