"""Assemble the phase diagram and write it as Parquet with its metadata.

The diagram is the table of stationary summaries with thermodynamic quantities, closed-form
predictions and regime labels, one row per point. Its Parquet key-value metadata contains the
resolved spec (`phases.spec`, JSON), the package version (`phases.version`) and the schema
version (`phases.schema_version`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from analysis.regimes import label_regimes
from analysis.thermo import add_thermodynamics


def build_phase_diagram(summaries: pl.DataFrame) -> pl.DataFrame:
    """Return the phase diagram: summaries + T, p, V, S, predictions and regime, sorted by point."""
    diagram = label_regimes(add_thermodynamics(summaries))
    sort_keys = [c for c in ("protocol", "noise", "seed", "radius", "wd", "lr") if c in diagram.columns]
    return diagram.sort(sort_keys, nulls_last=True)


def diagram_metadata(spec: dict[str, Any], version: str, schema_version: str) -> dict[str, str]:
    return {"phases.spec": json.dumps(spec, sort_keys=True), "phases.version": version, "phases.schema_version": schema_version}


def read_diagram_metadata(path: str | Path) -> dict[str, Any]:
    """Return the metadata of a diagram.parquet: spec (dict), version and schema_version."""
    raw = pq.read_schema(path).metadata or {}
    meta = {k.decode(): v.decode() for k, v in raw.items() if k.decode().startswith("phases.")}
    return {
        "spec": json.loads(meta["phases.spec"]) if "phases.spec" in meta else None,
        "version": meta.get("phases.version"),
        "schema_version": meta.get("phases.schema_version"),
    }
