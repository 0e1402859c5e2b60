"""Status files that a later run trusts: written whole or not at all, read back as valid or absent."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def write_json(path: Path, value: Any) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename it over `path`."""
    write_text(path, json.dumps(value, indent=1) + "\n")


def write_text(path: Path, text: str) -> None:
    """`write_json` for any text: the file holds the old text or the new, never part of either."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def read_json(path: Path, if_torn: str | None = None) -> Any | None:
    """The file's JSON value, or None when it is missing or torn (a half-written file is not status).

    `if_torn`: what happens instead, said in a one-line warning when the file is there but unreadable.
    """
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        if if_torn is not None:
            print(f"warning: {path} is unreadable ({exc.__class__.__name__}); {if_torn}", file=sys.stderr, flush=True)
        return None
