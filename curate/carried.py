"""Carried input columns in the sidecars: the typed copies of a source's extra columns.

A record's carried columns are `extra`, a JSON object, as KEY.json gets them. A source that knows
their types (curate/sources/url_list.py) gives them in `extra_types`: a META_TYPES name, or null
where a value has no type (a JSON null); for the others (an image folder's or a tar's json, a
corpus's other fields, a WARC's facts) each value's JSON type gives it (`value_type_name`), so
every sample's carried values reach the sidecar, whichever source it came from and whichever
sources share its shard. The pack step writes them as
`meta_<name>` sidecar columns, each typed over its shard's rows by `meta_type`, values converted
by `meta_value` (curate/contract.py, `sidecar_table`); `mm1 verify` checks them against KEY.json.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

# Carried input columns (a URL list's license, NSFW tag, source width...) in the sidecar: one column
# `meta_<name>` each, after ours, sorted by name. The prefix keeps them apart from our columns
# (KEY.json, where ours win a name clash, loses a source's `width`; the sidecar keeps both).
META_PREFIX = "meta_"
# The sidecar types a carried column keeps: those whose values survive `extra`'s JSON exactly. A
# column of any other type (dates, decimals, binary, lists, structs) is text, as KEY.json holds it.
META_TYPES: dict[str, pa.DataType] = {str(t): t for t in (
    pa.bool_(), pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(),
    pa.uint64(), pa.float32(), pa.float64(), pa.string(),
)}
_SMALL_INTS = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"}
_NUMBERS = _SMALL_INTS | {"uint64", "float", "double"}


def meta_type_name(dtype: pa.DataType) -> str:
    """The sidecar type of a carried column whose input file declares Arrow type `dtype`."""
    name = str(dtype)
    return name if name in META_TYPES else "string"


def value_type_name(value: Any) -> str | None:
    """The sidecar type of a carried value whose file declares none (JSON): None for a null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if -(2**63) <= value < 2**63 else "string"
    return "double" if isinstance(value, float) else "string"


def meta_type(names: set[str]) -> pa.DataType:
    """One column's type in one shard from its rows' types: the one type; integers of several
    widths give int64, numbers of several kinds float64, anything else mixed text; none: null."""
    if not names:
        return pa.null()
    if len(names) == 1:
        return META_TYPES.get(next(iter(names)), pa.string())
    if names <= _SMALL_INTS:
        return pa.int64()
    return pa.float64() if names <= _NUMBERS else pa.string()


def meta_value(value: Any, dtype: pa.DataType) -> Any:
    """A carried value (as `extra`'s JSON holds it) in a sidecar column of type `dtype`: text
    columns hold a non-text value as its JSON, float columns an integer as a float."""
    if value is None or isinstance(value, str):
        return value
    if pa.types.is_string(dtype):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return float(value) if pa.types.is_floating(dtype) and isinstance(value, int) else value
