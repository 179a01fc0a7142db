"""`refusal-edit evaluate BASE [EDITED]`: refusal rates, KL and loss of an edit against its base model."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from refusal_edit.cli.app import app, quiet_libraries
from refusal_edit.console import console
from refusal_edit.errors import RefusalEditError


def default_out(base: str, label: str) -> Path:
    return Path("runs") / base.replace("/", "--") / f"eval-{label.replace('/', '--')}"


@app.command()
def evaluate(
    base: str = typer.Argument(..., help="Base model: HF directory, .gguf file, recipe name/.toml, or Hub id."),
    edited: str | None = typer.Argument(None, help="Edited checkpoint (omit and pass --direction to use hooks)."),
    direction: Path | None = typer.Option(
        None, "--direction", help="direction.safetensors: apply it in memory instead of loading EDITED."
    ),
    intervention: str = typer.Option("ablate", "--intervention", help="With --direction: ablate | add."),
    coeff: float = typer.Option(1.0, help="add: multiple of the vector (+1 induces refusal, -1 bypasses)."),
    layer: int | None = typer.Option(None, help="add: layer (default: the direction's layer)."),
    site: str = typer.Option("input", help="add: input (of --layer) or attn (after --layer's attention)."),
    unit: bool = typer.Option(False, "--unit", help="add: add the unit direction instead of mean_diff."),
    harmful: str | None = typer.Option(
        None, help="Harmful prompts (default: the built-in test split): builtin:..., a file, or hf:NAME."
    ),
    harmless: str | None = typer.Option(None, help="Harmless prompts (default: the built-in test split)."),
    n: int = typer.Option(100, "--n", help="Prompts per set (category-balanced first n)."),
    max_new_tokens: int = typer.Option(64, help="Greedy tokens generated per prompt."),
    batch_size: int = typer.Option(32, help="Generation batch size (teacher forcing is capped by memory)."),
    samples: int = typer.Option(5, help="Sample responses shown side by side (harmful first, then harmless)."),
    markers: Path | None = typer.Option(None, "--markers", help="Refusal markers file, one per line."),
    out: Path | None = typer.Option(None, "--out", help="Report directory (default runs/<base>/eval-<edit>/)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON report on stdout."),
    record: bool = typer.Option(
        False, "--record", help="Write the summary into EDITED's refusal_edit.json and model card."
    ),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16 (auto: float32 on CPU)."),
    device: str = typer.Option("cpu", help="cpu|cuda|auto (auto uses accelerate's device map)."),
    system_prompt: str | None = typer.Option(
        None, "--system-prompt", help="System prompt; default: the recipe's, else the chat template's own."
    ),
    template: Path | None = typer.Option(None, "--template", help="Jinja chat template for models without one."),
) -> None:
    """Compare BASE with an edited checkpoint, or with a direction applied by hooks (nothing written):
    refusal rates (harmful and harmless, per category), first-token and multi-token KL, cross-entropy."""
    quiet_libraries()
    from refusal_edit.directions.artifacts import load_direction
    from refusal_edit.evaluation.report import print_report, record_evaluation, report_json, write_report
    from refusal_edit.evaluation.run import EvalSettings, intervention_from_direction
    from refusal_edit.evaluation.run import evaluate as run_evaluate
    from refusal_edit.loading import resolve_source

    if edited is not None and direction is not None:
        raise RefusalEditError("give either an EDITED checkpoint or --direction, not both")
    if edited is None and direction is None:
        raise RefusalEditError("give an EDITED checkpoint, or --direction to apply a direction in memory")
    if record and edited is None:
        raise RefusalEditError("--record writes into an EDITED checkpoint; it does not apply to --direction")

    hook = None
    info = None
    if direction is not None:
        d = load_direction(direction)
        hook = intervention_from_direction(d, intervention, coeff=coeff, layer=layer, site=site, unit=unit)
        info = {
            "direction_file": str(d.path),
            "direction_sha256": d.sha256,
            "direction_layer": d.layer,
            "direction_position": d.position,
            "unit": unit,
        }
    source = resolve_source(base, dtype)
    edited_source = resolve_source(edited, dtype) if edited is not None else None
    if record and edited_source is not None:
        from refusal_edit.checkpoint.card import RECORD

        if edited_source.kind != "dir" or not (edited_source.hf_dir / RECORD).is_file():
            raise RefusalEditError(f"--record needs EDITED to be a refusal-edit checkpoint directory (with {RECORD})")

    report = run_evaluate(
        source,
        edited_source,
        intervention=hook,
        edited_info=info,
        harmful=harmful,
        harmless=harmless,
        settings=EvalSettings(n=n, max_new_tokens=max_new_tokens, batch_size=batch_size, samples=samples),
        markers=markers,
        system_prompt=system_prompt,
        template=template,
        dtype=dtype,
        device=device,
    )
    label = edited_source.name if edited_source is not None else f"{intervention}-{Path(str(direction)).stem}"
    target = out or default_out(source.name, label)
    json_path, png_path = write_report(report, target)
    recorded = record_evaluation(edited_source.hf_dir, report) if record and edited_source is not None else None

    if as_json:
        sys.stdout.write(report_json(report))
        sys.stdout.flush()
        return
    print_report(report, console)
    console.print(f"report: {json_path}  plot: {png_path}")
    if recorded is not None:
        console.print(f"recorded the evaluation in {recorded} and README.md")
