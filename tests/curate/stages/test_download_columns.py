"""The download stage's image column builder: the same array as `pa.array`, its bodies copied once
into one buffer (the stage's own tests cover a batch that mixes fetched and local rows)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curate.stages.download import binary_array


@pytest.mark.parametrize("values", [
    [],
    [None],
    [b""],
    [None, None, None],
    [b"\xff\xd8\xff body", None, b"", b"\x89PNG" + bytes(range(256)) * 1000, None],
    [bytes([i]) * (i * 997) for i in range(1, 20)],  # odd sizes, more than one validity byte
])
def test_same_array_as_pa_array(values):
    built = binary_array(values, pa.binary())
    built.validate(full=True)
    assert built.equals(pa.array(values, pa.binary()))
    assert built.null_count == sum(v is None for v in values)


def test_other_binary_types_go_through_pa_array():
    values = [b"abc", None]
    built = binary_array(values, pa.large_binary())
    assert built.type == pa.large_binary() and built.to_pylist() == values


def test_the_buffer_holds_each_body_once():
    values = [b"a" * 1000, None, b"b" * 500]
    data = binary_array(values, pa.binary()).buffers()[2]
    assert data.size == 1500 and data.to_pybytes() == b"a" * 1000 + b"b" * 500
