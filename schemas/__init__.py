"""Versioned contracts of g2face-pipe, shipped as package data.

The JSON and Markdown files beside this module are the source of truth; code loads them from here so
that every stage, manifest writer and report uses the same lists.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def load_json(name: str) -> dict:
    """Read one contract file shipped in this package (e.g. ``status.json``)."""
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))


def sample_statuses() -> tuple[str, ...]:
    return tuple(load_json("status.json")["sample_status"])


def face_methods() -> tuple[str, ...]:
    return tuple(load_json("status.json")["face_method"])
