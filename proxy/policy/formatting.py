"""Cedar formatting for `proctor policy fmt` and the formatting check in `validate`."""

from __future__ import annotations

from pathlib import Path

import cedarpy

LINE_WIDTH = 80
INDENT = 2


def format_text(text: str) -> str:
    """The canonical Cedar formatting of `text` (comments kept). Raises ValueError on syntax errors."""
    return cedarpy.format_policies(text, LINE_WIDTH, INDENT)


def unformatted(policy_dir: Path) -> list[tuple[Path, str]]:
    """(file, formatted text) for every *.cedar file whose formatting differs from canonical.

    Files with syntax errors are skipped here; validation reports those.
    """
    out = []
    for f in sorted(Path(policy_dir).glob("*.cedar")):
        text = f.read_text()
        try:
            formatted = format_text(text)
        except ValueError:
            continue
        if formatted != text:
            out.append((f, formatted))
    return out
