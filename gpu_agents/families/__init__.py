"""Model families: one module per diffusers pipeline family (see base.py for what a family declares).

Adding a family is one module with a FAMILY object, listed here, plus its tests; no stage changes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import helios, ltx2, wan
from .base import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (wan.FAMILY, ltx2.FAMILY, helios.FAMILY)


def family_for(model_index: Mapping[str, Any], where: str) -> ModelFamily:
    """The family that claims a local directory by its model_index.json."""
    for family in FAMILIES:
        if family.claims(model_index):
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise ValueError(f"{where}: no model family serves a {model_index.get('_class_name')!r} pipeline "
                     f"(families: {known})")
