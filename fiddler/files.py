"""Writing result files safely.

``read_json`` gives one clear error for a missing or malformed file.

Contract: ``write_text_atomic`` / ``write_json_atomic(path, payload)`` leave either the previous file or the complete
new one, never a half-written file: it writes a temporary file beside the target, flushes it
to disk, and renames it over the target; on any failure (a full disk, say) the temporary file
is removed and the error is raised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: str | Path, missing: str, invalid: str) -> object:
    """A JSON file's content; one clear error when it is absent (``missing``) or not JSON
    (``invalid`` says what to do)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(missing) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {invalid}") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, payload: object) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, default=str))
