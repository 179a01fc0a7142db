"""`refusal-edit archs`: the supported architectures and how each is edited."""

from __future__ import annotations

from rich.table import Table

from refusal_edit.arch import ARCHITECTURES
from refusal_edit.cli.app import app
from refusal_edit.console import console


@app.command()
def archs() -> None:
    """List the supported model types, their residual writers and baked-bias routes."""
    table = Table(title="supported architectures")
    for col in ("model_type", "residual writers", "sandwich norms", "add: input site", "add: attn site"):
        table.add_column(col)
    for spec in ARCHITECTURES.values():
        writers = sorted({r.pattern.split("\\.")[-2] if "\\." in r.pattern else r.pattern for r in spec.tensors})
        routes = {site: [r for r in spec.bias_routes if r.site == site] for site in ("input", "attn")}

        def describe(rs: list, site: str) -> str:
            if not rs:
                return "layer 0 only" if site == "input" else "-"
            r = rs[0]
            text = f"{r.target}.bias" + (f" ({r.flag})" if r.flag else "")
            return text + (f" as {r.relabel}" if r.relabel else "")

        table.add_row(
            spec.model_type,
            ", ".join(writers),
            "yes" if spec.post_norms else "",
            describe(routes["input"], "input"),
            describe(routes["attn"], "attn"),
        )
    console.print(table)
