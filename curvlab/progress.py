"""Progress bars for long jobs (tqdm), shown on terminals only unless asked."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", enabled: bool | None = None, **options):
    """A tqdm bar; ``enabled=None`` shows it only when stderr is a terminal.

    ``enabled=False`` (the ``progress=False`` of every long-running function)
    silences it; bars are transient (``leave=False``) so logs stay clean.
    """
    return tqdm(
        total=total, desc=desc, disable=None if enabled is None else not enabled, leave=False, **options
    )
