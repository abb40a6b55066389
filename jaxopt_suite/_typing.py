"""Type aliases shared by the library's modules."""

from __future__ import annotations

from typing import Any

#: A pytree of arrays (nested tuples, lists, dicts, flax ``State`` ...).
PyTree = Any
