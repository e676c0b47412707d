"""Typed access to the metadata of a GGUF file (shared by the weight and tokenizer loaders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader

_MISSING = object()


def open_gguf(path: str | Path) -> GGUFReader:
    """Memory-maps a GGUF file read-only; tensor data is read lazily."""
    return GGUFReader(Path(path), "r")


def gguf_field(reader: GGUFReader, key: str, default: Any = _MISSING) -> Any:
    """The value of metadata `key` as a Python scalar, str or list.

    Raises KeyError when `key` is absent and no default is given.
    """
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise KeyError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()
