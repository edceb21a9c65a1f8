"""Reading scaling-law data: a CSV with a header row (docs/design.md §7 names the columns)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from loopdyn.models.errors import InputError
from loopdyn.scaling.forms import COLUMNS, _form

def read_law_csv(path: str | Path, law: str | None = None) -> dict[str, np.ndarray]:
    """Read a CSV with a header row into ``{column: float array}``.

    Known columns (``loops, mean_recurrence, params, tokens, experts, flops, loss``) are
    returned; others are ignored. With ``law`` given, that law's columns and ``loss`` must
    be present and every value in them a finite positive number (errors name the column and
    the line), and there must be at least as many rows as the law has parameters. Columns a
    law does not need are read leniently (unparseable cells become NaN).
    """
    from loopdyn.io import CSV_LIMIT, read_small

    path = Path(path)
    required: tuple[str, ...] = ()
    if law is not None:
        form = _form(law)
        required = form.columns + ("loss",)
    try:
        text = read_small(path, CSV_LIMIT, "CSV file").decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 text CSV file") from None
    reader = csv.reader(line for line in text.splitlines())
    rows = [(i + 1, r) for i, r in enumerate(reader) if r and any(c.strip() for c in r)
            and not r[0].lstrip().startswith("#")]
    if not rows:
        raise InputError(f"{path} is empty (expected a header row)")
    header = [h.strip().lower() for h in rows[0][1]]
    data = rows[1:]
    missing = [c for c in required if c not in header]
    if missing:
        have = ", ".join(h for h in header if h) or "none"
        raise InputError(f"{path}: the {law} law needs column(s) {', '.join(missing)} "
                         f"(found: {have})")
    if not data:
        raise InputError(f"{path} has a header but no data rows")
    out: dict[str, np.ndarray] = {}
    for name in COLUMNS:
        if name not in header:
            continue
        j = header.index(name)
        strict = name in required
        vals = np.empty(len(data))
        for k, (lineno, r) in enumerate(data):
            cell = r[j].strip() if j < len(r) else ""
            try:
                v = float(cell)
            except ValueError:
                if strict:
                    shown = repr(cell) if cell else "empty"
                    raise InputError(f"{path} line {lineno}: {name} is {shown}, not a number") from None
                v = math.nan
            if strict and not math.isfinite(v):
                raise InputError(f"{path} line {lineno}: {name} is {cell}, not a finite number")
            if strict and v <= 0:
                raise InputError(f"{path} line {lineno}: {name} must be positive, got {cell}")
            vals[k] = v
        out[name] = vals
    if law is not None:
        p = len(_form(law).params)
        if len(data) < p:
            raise InputError(f"{path}: the {law} law has {p} parameters but the file has only "
                             f"{len(data)} data row(s)")
        if "experts" in required and np.any(out["experts"] < 1):
            k = int(np.argmax(out["experts"] < 1))
            raise InputError(f"{path} line {data[k][0]}: experts must be >= 1")
    return out
