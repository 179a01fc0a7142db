"""`refusal-edit extract MODEL`: generate candidate directions and select the refusal direction."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from refusal_edit.cli.app import app, quiet_libraries
from refusal_edit.console import console


def default_out(name: str) -> Path:
    return Path("runs") / name.replace("/", "--")


@app.command()
def extract(
    model: str = typer.Argument(..., help="HF directory, .gguf file, recipe name/.toml, or Hub id."),
    out: Path | None = typer.Option(None, "--out", help="Artifact directory (default runs/<model>/)."),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16 (auto: float32 on CPU)."),
    device: str = typer.Option("cpu", help="cpu|cuda|auto (auto uses accelerate's device map)."),
    system_prompt: str | None = typer.Option(
        None, "--system-prompt", help="System prompt; default: the chat template's own default."
    ),
    template: Path | None = typer.Option(None, "--template", help="Jinja chat template for models without one."),
    harmful: str | None = typer.Option(
        None, help="Harmful prompts: builtin:harmful, a file, or hf:NAME[@SPLIT][#COL]."
    ),
    harmless: str | None = typer.Option(None, help="Harmless prompts (same forms)."),
    n_train: int | None = typer.Option(None, help="Training prompts per side (default: all)."),
    n_val: int = typer.Option(32, help="Validation prompts per side for selection."),
    batch_size: int = typer.Option(16, help="Forward batch size."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Score every candidate in full (reference)."),
    top_k: int | None = typer.Option(None, help="Candidates scored in full after the proxy ranking [8]."),
    kl_threshold: float | None = typer.Option(None, help="Discard candidates with KL above this [0.1]."),
    induce_threshold: float | None = typer.Option(
        None, help="Discard candidates whose induce score is below this [0.0]."
    ),
    prune_layers: float | None = typer.Option(None, help="Discard candidates in this last fraction of layers [0.2]."),
    refusal_tokens: str | None = typer.Option(
        None, help="Comma-separated refusal starts (default: derived from the model's own refusals)."
    ),
    no_filter: bool = typer.Option(False, "--no-filter", help="Keep every training prompt (no refusal filter)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
) -> None:
    """Find the refusal direction: difference in means at every layer and post-instruction position,
    then select by the paper's bypass / induce / KL criteria on validation prompts."""
    quiet_libraries()
    from refusal_edit.directions.extract import ExtractSettings, run_extract
    from refusal_edit.directions.select import SelectionSettings
    from refusal_edit.loading import load_model, resolve_source
    from refusal_edit.prompts import chat_format, load_prompts

    source = resolve_source(model, dtype)
    recipe = source.recipe
    system = system_prompt if system_prompt is not None else (recipe.system_prompt if recipe else None)
    harmful_src = harmful or (recipe.harmful if recipe else "builtin:harmful")
    harmless_src = harmless or (recipe.harmless if recipe else "builtin:harmless")
    harmful_set, harmless_set = load_prompts(harmful_src), load_prompts(harmless_src)
    lm = load_model(source, dtype=dtype, device=device)
    fmt = chat_format(lm.tokenizer, system=system, template_file=template)
    settings = ExtractSettings(
        n_train=n_train,
        n_val=n_val,
        batch_size=batch_size,
        filter_train=not no_filter,
        exhaustive=exhaustive,
        refusal_tokens=[t for t in refusal_tokens.split(",") if t] if refusal_tokens else None,
        # Built-in defaults (the paper's), then the recipe's overrides, then the command line.
        selection=SelectionSettings.merged(
            {"batch_size": max(batch_size, 1)},
            recipe.select if recipe else None,
            {
                "kl_threshold": kl_threshold,
                "induce_threshold": induce_threshold,
                "prune_layer_fraction": prune_layers,
                "top_k": top_k,
            },
        ),
    )
    target = out or default_out(source.name)
    sel_cfg = settings.selection
    console.print(
        f"model {source.name} ({lm.dtype}, {lm.device}); template: {fmt.describe()['template']}, "
        f"system prompt: {fmt.describe()['system_prompt']!r}; filters: KL <= {sel_cfg.kl_threshold}, "
        f"induce >= {sel_cfg.induce_threshold}, layers < {sel_cfg.max_layer(lm.model.config.num_hidden_layers)}"
    )
    result = run_extract(lm, fmt, harmful_set, harmless_set, settings, target, force=force)
    sel = result.selection
    table = Table(title=f"selected refusal direction ({sel.method}, {sel.evaluated} candidates scored)")
    for col in ("layer", "position", "token", "bypass", "induce", "KL", "base harmful", "base harmless"):
        table.add_column(col, justify="right")
    c = sel.chosen
    table.add_row(
        str(c.layer),
        str(c.position),
        repr(result.run["chosen"]["position_token"]),
        f"{c.bypass:.3f}",
        f"{c.induce:.3f}",
        f"{c.kl:.4f}",
        f"{sel.base['harmful_refusal_score']:.3f}",
        f"{sel.base['harmless_refusal_score']:.3f}",
    )
    console.print(table)
    console.print(f"selection took {sel.seconds:.1f} s; artifacts in {result.out}")
    known = recipe.result if recipe else {}
    if "layer" in known and "position" in known:
        same = (known["layer"], known["position"]) == (c.layer, c.position)
        console.print(
            f"recipe's measured result: layer {known['layer']}, position {known['position']}"
            + (" (the same candidate)" if same else " (differs: other prompts, settings or library versions)")
        )
