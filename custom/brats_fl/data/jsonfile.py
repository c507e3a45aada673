"""Read a JSON file a person wrote (a datalist, a site configuration) the one way every reader of such files uses.

Hand-written because the standard library's reader has no size limit and lets a deeply nested file raise
RecursionError; here every failure is a ValueError that says what is wrong, and the caller names the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: the largest such file read: a datalist of 10,000 cases takes about 3 MB
MAX_JSON_BYTES = 64 * 2**20


def read_json(path: Path) -> Any:
    """The document in ``path``; raises ValueError (file too large, not UTF-8, not JSON, nested too deeply)."""
    size = Path(path).stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{size:,} bytes, more than the {MAX_JSON_BYTES:,} a datalist or configuration may have")
    try:
        return json.loads(Path(path).read_bytes())
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text: {err}") from err
    except RecursionError as err:
        raise ValueError("not valid JSON: nested too deeply") from err


def kind(value: Any) -> str:
    """A JSON value's type in JSON's words, for messages about a value of the wrong type."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message quotes a bad value, never a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
