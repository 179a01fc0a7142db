"""`refusal-edit archs [MODEL]`: the supported architectures, or what an edit would do to one checkpoint."""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from refusal_edit.cli.app import app, examples, quiet_libraries
from refusal_edit.cli.options import EDIT, MODEL_HELP
from refusal_edit.console import err, show

if TYPE_CHECKING:  # what the workflow returns, for the annotations only
    from refusal_edit.arch import ArchSpec, BiasRoute, TensorRule
    from refusal_edit.edits.plan import EditPlan
    from refusal_edit.edits.preview import PlannedTensor

LAYOUTS = {"experts": " [E,H,I]", "experts_t": " [E,I,H]", "experts_bias": " [E,H]"}


def _writer_label(rule: TensorRule) -> str:
    """`self_attn.o_proj`, `mlp.experts.E.down_proj`, `mlp.experts.down_proj [E,I,H]` (no layer prefix)."""
    text = re.sub(r"^.*?\bN\.", "", rule.label)
    return text.removesuffix(".weight") + LAYOUTS.get(rule.kind, "")


def _route(routes: list[BiasRoute], site: str) -> str:
    """The config flag that bakes an addition at `site` (`always`: the bias exists), or where it cannot."""
    if not routes:
        return "layer 0" if site == "input" else "-"
    r = routes[0]
    return (r.flag or "always") + (f" as {r.relabel}" if r.relabel else "")


def architectures_table(specs: list[ArchSpec]) -> Table:
    """One row per model type: residual writers (one per line), sandwich norms, the flags that bake
    `--mode add` at each site, and the stock class that loads the result."""
    table = Table(title=f"supported architectures ({len(specs)})")
    table.add_column("model_type", no_wrap=True)
    table.add_column("residual writers", no_wrap=True)
    table.add_column("sandwich norms", overflow="fold")
    table.add_column("add: input / attn", overflow="fold")
    table.add_column("stock class", overflow="fold")
    for spec in specs:
        writers = dict.fromkeys(_writer_label(r) for r in spec.tensors if r.kind != "bias")
        norms = "\n".join(s.post_norm for s in spec.sites if s.post_norm)
        routes = [_route([r for r in spec.bias_routes if r.site == site], site) for site in ("input", "attn")]
        table.add_row(spec.model_type, "\n".join(writers), norms, " / ".join(routes), spec.stock_class)
    return table


def plan_table(plan: EditPlan, rows: list[PlannedTensor], title: str) -> Table:
    """Every tensor a plan edits or creates (orthogonalize --plan-only shows the same table)."""
    table = Table(title=escape(title))
    table.add_column("tensor", no_wrap=True)
    for col in ("layer", "site", "action", "shape", "sandwich norm"):
        table.add_column(col, overflow="fold")
    for r in rows:
        layer = "" if r.layer is None else str(r.layer)
        action = r.action + (f" ({r.note})" if r.note else "")
        shape = "x".join(map(str, r.shape))
        norm = re.sub(r"^.*\.\d+\.", "", r.norm or "").removesuffix(".weight")  # layer-relative
        table.add_row(escape(r.name), layer, r.site, action, shape, escape(norm))
    return table


def plan_summary(rows: list[PlannedTensor]) -> str:
    """`12 edited (8 linear, 1 embedding, ...), 1 created`."""
    edited = Counter(r.kind for r in rows if r.kind != "new")
    created = sum(r.kind == "new" for r in rows)
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(edited.items()))
    return f"{sum(edited.values())} tensors edited{f' ({parts})' if parts else ''}, {created} created"


@app.command(
    short_help="The supported architectures, or every tensor an edit of MODEL would change.",
    epilog=examples(
        "refusal-edit archs  # every supported model type",
        "refusal-edit archs qwen2.5-coder-0.5b-instruct     # every tensor an edit would change, nothing written",
    ),
)
def archs(
    model: str | None = typer.Argument(
        None, metavar="[MODEL]", help=MODEL_HELP + " Show every tensor the edit would change (nothing is written)."
    ),
    keep_tied: bool = typer.Option(
        False, "--keep-tied", help="Plan as orthogonalize --keep-tied would.", rich_help_panel=EDIT
    ),
) -> None:
    """List the supported model types, their residual writers and baked-bias routes; with MODEL, the plan."""
    from refusal_edit.workflows import archs as workflow

    if model is None:
        show(architectures_table(workflow.architectures()))
        show(
            "Any other decoder language model transformers knows (causal LM or image-text-to-text) is derived and "
            "verified on first use: its writers are found on a tiny instance built from its config and the edit is "
            "checked exact there before any real weight is read (cached per model type and transformers version)."
        )
        return
    quiet_libraries()
    plan, rows = workflow.preview(model, keep_tied)
    show(plan_table(plan, rows, f"{plan.spec.model_type} ({plan.spec.stock_class}): {model}"))
    show(plan_summary(rows))
    for note in plan.notes:
        err.print(f"- {escape(note)}", soft_wrap=True)
