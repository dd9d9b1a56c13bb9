"""Validate a compose document against the Compose specification's JSON schema (vendored in tests/data)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "data" / "compose-spec.json").read_text())


def validate(doc: dict) -> list[str]:
    """Every schema error as `path: message`; an empty list means the document is valid."""
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
