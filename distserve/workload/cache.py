"""On-disk cache of prepared samples (tokenizing all of ShareGPT takes ~40 s here), keyed
by dataset, seed and a fingerprint of the tokenizer. Arrays, not JSON: fast to load."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from distserve.workload.datasets import Sample


def cache_dir() -> str:
    root = os.environ.get("DISTSERVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "distserve"
    )
    return os.path.join(root, "datasets")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend", None)
    text = (
        backend.to_str()
        if backend is not None and hasattr(backend, "to_str")
        else repr(getattr(backend, "vocab_size", tokenizer))
    )
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def cached_samples(
    key: str, make: Callable[[], tuple[list[Sample], dict[str, Any]]]
) -> tuple[list[Sample], dict[str, Any]]:
    """The samples stored under `key`, or `make()`'s, stored for next time."""
    path = os.path.join(cache_dir(), f"{key}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            ids, offsets, outputs = z["ids"], z["offsets"], z["outputs"]
            info = json.loads(str(z["info"]))
        samples = [
            (ids[offsets[i] : offsets[i + 1]].tolist(), int(outputs[i]))
            for i in range(len(outputs))
        ]
        return samples, info | {"cached": path}
    samples, info = make()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    offsets = np.cumsum([0] + [len(p) for p, _ in samples]).astype(np.int64)
    flat = np.fromiter((t for p, _ in samples for t in p), dtype=np.int32, count=int(offsets[-1]))
    tmp = path + f".{os.getpid()}.tmp.npz"
    np.savez(
        tmp,
        ids=flat,
        offsets=offsets,
        outputs=np.array([o for _, o in samples], dtype=np.int32),
        info=json.dumps(info),
    )
    os.replace(tmp, path)
    return samples, info
