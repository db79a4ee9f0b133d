"""Our GGUF header parser against the `gguf` package's reader on the bundled file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from distserve.model.gguf_reader import GGUFReader
from distserve.model.registry import resolve

pytestmark = pytest.mark.slow  # reads the real model's GGUF file


@pytest.fixture(scope="module")
def path() -> str:
    return resolve("smollm2-135m").path  # type: ignore[return-value]


def test_same_metadata_and_tensors_as_the_gguf_package(path):
    ours, theirs = GGUFReader(path), gguf.GGUFReader(path)
    assert ours.fields.keys() == {k for k in theirs.fields if not k.startswith("GGUF.")}
    for key, value in ours.fields.items():
        expected = theirs.fields[key].contents()
        if isinstance(expected, float):
            assert value == pytest.approx(expected), key
        else:
            assert value == expected, key
    assert len(ours.tensors) == len(theirs.tensors) == 272
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type) == (b.name, int(b.tensor_type))
        assert a.shape == tuple(int(d) for d in b.shape)
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
        assert np.array_equal(a.data, b.data), a.name


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFReader(str(bad))
