"""PNG figures: matplotlib without a display, and one way to lay out, save and close a figure.

Every report (the pipeline's, ``tli compare``'s, the tune stage's plot) draws through here, so
their PNGs are made the same way on every machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display; the same bytes on every machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 100) -> None:
    """Lay ``fig`` out, write it to ``path`` as PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def save_all(out: Path, drawers: Iterable[tuple[str, Callable[[], Any]]]) -> list[str]:
    """Draw each ``(name, draw)`` into ``out / name``; a ``draw`` may return None (nothing to
    show). Returns the names drawn, in order."""
    made = []
    for name, draw in drawers:
        fig = draw()
        if fig is None:
            continue
        save(fig, out / name)
        made.append(name)
    return made
