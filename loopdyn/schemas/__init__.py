"""JSON Schemas of loopdyn's machine-readable outputs (docs/design.md §7).

`audit` — `loopdyn audit --json`; `alert` — one line of `loopdyn train --alerts` (JSON Lines);
`summary` — `loopdyn compare`'s summary.json. The schemas ship in the package, so other tools can
check what they read: `validate("audit", json.load(f))` raises `jsonschema.ValidationError`
naming the first field that breaks the contract (`pip install jsonschema`).
"""
from __future__ import annotations

import json
from functools import cache
from importlib import resources

KINDS = ("audit", "alert", "summary")


@cache
def schema(kind: str) -> dict:
    """The JSON Schema (draft 2020-12) of one output kind."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return json.loads(resources.files(__name__).joinpath(f"{kind}.schema.json").read_text(encoding="utf-8"))


def validate(kind: str, instance) -> None:
    """Check one output against its schema; raises jsonschema.ValidationError on the first breach."""
    import jsonschema

    jsonschema.Draft202012Validator(schema(kind)).validate(instance)
