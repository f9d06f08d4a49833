"""Where a benchmark's JSON goes: its ``--out`` path, written atomically (a run cut off by its time
limit never leaves half a file), and a copy in ``$OUT`` when that is set, because the device
machine sends back only what lies under ``$OUT``."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))  # lorasoup, when bench/ runs from a checkout

from lorasoup.artifacts import write_json_atomic


def write_result(result: Any, out: str | Path) -> list[Path]:
    """Write ``result`` to ``out`` and to ``$OUT/<name>`` unless that is the same file; the paths written."""
    path = Path(out)
    write_json_atomic(path, result)
    written = [path]
    target = os.environ.get("OUT")
    if target:
        copy = Path(target) / path.name
        if copy.resolve() != path.resolve():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, copy)
            written.append(copy)
    return written
