"""Where benchmark and replay results go unless the user names a folder, and what each result file
records about where it came from.

Defaults never write into a source tree: the committed results under ``bench/results/`` are the
ones the README cites, so a run overwrites them only when asked to (``--out bench/results``).
"""
from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

RESULTS_ENV = "CATTN_RESULTS_DIR"      # names the results folder for every command at once
LOCAL_FOLDER = "cattn-results"         # the default under the current directory


def source_tree(start: str | os.PathLike) -> Path | None:
    """The cattn source tree (a folder with ``pyproject.toml`` and ``cattn/__init__.py``) or installed
    package folder that holds ``start``, or None."""
    path = Path(start).resolve()
    package = Path(__file__).resolve().parent
    for folder in (path, *path.parents):
        checkout = (folder / "pyproject.toml").is_file() and (folder / "cattn" / "__init__.py").is_file()
        if folder == package or checkout:
            return folder
    return None


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cattn/results``, by default ``~/.cache/cattn/results``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cattn" / "results"


def results_dir(named: str | os.PathLike | None = None) -> Path:
    """The folder results go to, created: ``named`` when given, else ``$CATTN_RESULTS_DIR``, else
    ``./cattn-results`` -- or the user cache folder (`user_cache_dir`) when the current directory is
    inside cattn's source tree, so that a default run leaves the checkout as it was."""
    if named is None and os.environ.get(RESULTS_ENV):
        named = os.environ[RESULTS_ENV]
    if named is not None:
        path = Path(named)
    elif source_tree(Path.cwd()) is not None:
        path = user_cache_dir()
    else:
        path = Path.cwd() / LOCAL_FOLDER
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_commit(folder: str | os.PathLike | None = None) -> str | None:
    """The commit checked out in the git work tree that holds ``folder`` (default: this package's),
    with ``-dirty`` appended when tracked files differ from it; None outside a git work tree."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        run = lambda *cmd: subprocess.run(["git", "-C", str(folder), *cmd], capture_output=True, text=True,
                                          timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):   # no git, or it hung
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def provenance() -> dict:
    """What every benchmark and replay JSON records: ``cattn`` (version), ``git_commit`` (None when
    cattn is not run from a git checkout) and ``timestamp`` (UTC, ISO 8601)."""
    import cattn

    return dict(cattn=cattn.__version__, git_commit=git_commit(),
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
