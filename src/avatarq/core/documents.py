"""Typed on-disk documents: one schema layer for every JSON file avatarq writes and reads.

A document type is a plain dataclass (manifest, engine records, calibration artifact,
report, options). pydantic validates it through a `TypeAdapter` in strict JSON mode: a
wrong type (``"z_dim": "sixteen"``, ``1.5`` for an int, ``true`` for a number), an unknown
key, a missing field or absurd nesting is a one-line `AvatarqError` naming the file and the
field, before anything else reads the data. Dataclass ``__post_init__`` checks run too.
The same adapters write the JSON and publish the JSON Schemas (docs/schemas/).

Floats that may be infinite or NaN (a PSNR of identical outputs) use `JsonFloat`: written
as the strings "Infinity", "-Infinity", "NaN" so the JSON stays strict, read back as floats.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ConfigDict, PlainSerializer, TypeAdapter, ValidationError

from avatarq.errors import AvatarqError

T = TypeVar("T")
#: Strict types, no unknown keys: the pydantic config of every document dataclass.
DOCUMENT_CONFIG = ConfigDict(strict=True, extra="forbid")
MAX_DOCUMENT_BYTES = 256 << 20


def json_float(x: float) -> float | str:
    """A float for strict JSON: finite numbers as they are, non-finite ones as the strings
    "NaN", "Infinity", "-Infinity" (read back by Python's float() and JavaScript's Number())."""
    x = float(x)
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _float_from_json(value: Any) -> Any:
    if value in ("Infinity", "-Infinity", "NaN"):
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


#: A float field that may hold inf or NaN (see the module docstring).
JsonFloat = Annotated[
    float,
    BeforeValidator(_float_from_json),
    PlainSerializer(json_float, return_type=float | str, when_used="json"),
]


@functools.cache
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    message = "unknown field" if error["type"] == "unexpected_keyword_argument" else error["msg"]
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    more = exc.error_count() - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    value = error.get("input")
    shown = "" if isinstance(value, dict | list) else f", got {value!r}"[:80]
    return f"{where}: {message[0].lower()}{message[1:]}{shown}{tail}"


def parse_document(text: str | bytes, kind: type[T], what: str) -> T:
    """Validate JSON ``text`` as a ``kind`` document; ``what`` names it in errors."""
    try:
        return _adapter(kind).validate_json(text, strict=True)
    except AvatarqError as exc:  # a dataclass's own __post_init__ check
        raise AvatarqError(f"{what} is malformed: {exc}") from None
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise AvatarqError(f"{what} is not valid JSON ({exc.errors()[0]['msg']})") from None
        raise AvatarqError(f"{what} is malformed: {_first_error(exc)}") from None
    except RecursionError:
        raise AvatarqError(f"{what} is nested too deeply to be an avatarq document") from None


def load_document(path: str | Path, kind: type[T], what: str | None = None) -> T:
    """Read and validate the ``kind`` document at ``path`` (see `parse_document`)."""
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise AvatarqError(f"{what} not found" if not path.exists() else f"{what} is not a file")
    if path.stat().st_size > MAX_DOCUMENT_BYTES:
        raise AvatarqError(f"{what} is {path.stat().st_size} bytes; not an avatarq document")
    return parse_document(path.read_bytes(), kind, what)


def dump_document(document: Any, kind: Any = None) -> str:
    """The document as indented strict JSON (a trailing newline)."""
    adapter = _adapter(kind if kind is not None else type(document))
    return adapter.dump_json(document, indent=2).decode() + "\n"


def document_dict(document: Any, kind: Any = None) -> dict[str, Any]:
    """The document as JSON-ready Python data (what `dump_document` writes)."""
    adapter = _adapter(kind if kind is not None else type(document))
    return adapter.dump_python(document, mode="json")


def document_schema(kind: Any) -> dict[str, Any]:
    """The JSON Schema of a document type (as published in docs/schemas/)."""
    return _adapter(kind).json_schema()


def load_versioned_document(
    path: str | Path, kind: type[T], version: int | tuple[int, ...], what: str, fix: str
) -> T:
    """`load_document` after checking the document's ``schema_version`` (so an older or
    newer file gets a message saying so, not a list of missing fields); ``version`` is the
    one readable version or a tuple of them; ``fix`` ends the message."""
    versions = version if isinstance(version, tuple) else (version,)
    found = read_json_object(Path(path)).get("schema_version")
    if isinstance(found, bool) or found not in versions:
        readable = " or ".join(str(v) for v in versions)
        raise AvatarqError(
            f"{what} schema_version is {found!r}; this avatarq reads {readable} ({fix})"
        )
    return load_document(path, kind, what)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object stored at ``path`` (for documents without a schema of their own);
    malformed JSON or another top-level type is an AvatarqError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AvatarqError(f"{path} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise AvatarqError(f"{path} must hold a JSON object")
    return data


def known_fields(cls: type, data: Any, what: str) -> dict[str, Any]:
    """``data`` as a dict after checking that every key is a field of dataclass ``cls``.

    Raises:
        AvatarqError: "unknown WHAT(s) [...]" naming the keys ``cls`` does not have.
    """
    if not isinstance(data, dict):
        data = dict(data)
    unknown = sorted(set(data) - set(cls.__dataclass_fields__))
    if unknown:
        raise AvatarqError(f"unknown {what}(s) {unknown}")
    return dict(data)


def attributes(source: Any, names: Iterable[str], suffix: str = "") -> dict[str, Any]:
    """{name + suffix: source.name} for each of ``names``: the keyword arguments that copy
    same-named attributes of a result into a record."""
    return {name + suffix: getattr(source, name) for name in names}


def shared_fields(source: Any, record: type, **overrides: Any) -> Any:
    """Dataclass ``record`` built from the attributes of ``source`` that have its fields'
    names, ``overrides`` taking precedence (and supplying what ``source`` lacks)."""
    names = [n for n in record.__dataclass_fields__ if n not in overrides and hasattr(source, n)]
    return record(**attributes(source, names), **overrides)
