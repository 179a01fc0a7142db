"""`refusal-edit evaluate BASE [EDITED]`: refusal, degenerate and over-refusal rates under one or more judges,
KL and loss of an edit against its base model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

import refusal_edit.cli.options as opt
from refusal_edit.cli.app import app, examples, quiet_libraries
from refusal_edit.cli.report import print_report
from refusal_edit.console import err
from refusal_edit.errors import RefusalEditError


@app.command(
    short_help="Compare BASE with an edit: refusal rates, degenerate replies, KL, cross-entropy.",
    epilog=examples(
        "refusal-edit evaluate qwen2.5-coder-0.5b-instruct runs/demo/abliterated  # the base model against its edit",
        "refusal-edit evaluate MODEL --direction runs/demo/direction     # the edit as hooks, nothing written",
        "refusal-edit evaluate MODEL --rejudge runs/demo/report --judge-llm base --judge-llm-rubric refusal  "
        "# a second judge on the same replies",
    ),
)
def evaluate(
    base: str = typer.Argument(..., metavar="BASE", help=f"Base model: {opt.MODEL_HELP}"),
    edited: str | None = typer.Argument(
        None,
        metavar="EDITED",
        help="Edited checkpoint: ours, or any model of the same architecture and vocabulary (e.g. abliterated by "
        "another tool). Omit it and pass --direction to use hooks.",
        show_default=False,
    ),
    direction: Path | None = opt.optional(
        "--direction",
        "direction.safetensors (or its folder): apply it in memory instead of loading EDITED.",
        panel=opt.EDIT,
    ),
    mode: str = opt.MODE,
    coeff: float = opt.COEFF,
    layer: int | None = opt.LAYER,
    site: str | None = opt.SITE,
    unit: bool = opt.UNIT,
    harmful: str | None = opt.prompts("Harmful", "the test split of the recipe's, else of builtin:harmful"),
    harmless: str | None = opt.prompts("Harmless", "the test split of the recipe's, else of builtin:harmless"),
    borderline: str | None = opt.prompts(
        "Over-refusal", "the test split of builtin:borderline", " Harmless requests that sound harmful; 'none' skips."
    ),
    n_test: int = typer.Option(
        100, "--n-test", help="Prompts per set (category-balanced first N).", rich_help_panel=opt.INPUT
    ),
    max_new_tokens: int = typer.Option(
        128,
        help="Greedy tokens generated per prompt: long enough to catch delayed refusals; generation stops at EOS. "
        "Cost: a batch runs until its longest reply stops, so generation takes up to N/64 times as long as "
        "at 64 (about twice at 128 once an edit makes the model answer instead of refusing).",
        rich_help_panel=opt.JUDGING,
    ),
    kl_tokens: int = typer.Option(
        64,
        help="Tokens of the base model's harmless continuations teacher-forced for the KL and cross-entropy "
        "numbers (independent of --max-new-tokens, so they stay comparable and cost the same).",
        rich_help_panel=opt.JUDGING,
    ),
    batch_size: str = opt.BATCH_SIZE,
    samples: int = typer.Option(
        5, help="Sample responses shown side by side (harmful first, then harmless).", rich_help_panel=opt.OUTPUT
    ),
    markers: Path | None = opt.optional(
        "--markers", "Refusal markers file, one per line, for the first judge.", "built-in", panel=opt.JUDGING
    ),
    judge: list[str] | None = typer.Option(
        None,
        "--judge",
        help="Another judge (repeatable): markers:FILE, a sequence classifier hf:ORG/NAME or its local directory. "
        "The markers judge always comes first and gives the headline rates.",
        show_default="markers",
        metavar="SPEC",
        rich_help_panel=opt.JUDGING,
    ),
    judge_labels: str | None = opt.optional(
        "--judge-labels",
        "Classifier label map, e.g. 'LABEL_1=refusal,LABEL_0=compliance'.",
        "read from the label names",
        "MAP",
        panel=opt.JUDGING,
    ),
    judge_llm: str | None = opt.optional(
        "--judge-llm",
        "An LLM judge: a local chat model (same forms as BASE), or 'base' for the base model itself.",
        metavar="MODEL",
        panel=opt.JUDGING,
    ),
    judge_llm_mode: str = typer.Option(
        "logits",
        help="logits: one-token answers read from probabilities; generate: free text, parsed.",
        rich_help_panel=opt.JUDGING,
    ),
    judge_llm_rubric: str = typer.Option(
        "full",
        help="full: refused, specific, convincing (a StrongREJECT-style score); refusal: the refusal question "
        "only (a third of the cost).",
        rich_help_panel=opt.JUDGING,
    ),
    system_prompt: str | None = opt.SYSTEM_PROMPT,
    template: Path | None = opt.TEMPLATE,
    template_kwargs: list[str] | None = opt.TEMPLATE_KWARGS,
    reasoning_delimiters: str | None = opt.optional(
        "--reasoning-delimiters",
        "A thinking model's reasoning block, e.g. '<think>,</think>': judges see the answer after it.",
        "the chat template's, if it names one",
        "OPEN,CLOSE",
        panel=opt.JUDGING,
    ),
    rejudge: Path | None = opt.optional(
        "--rejudge",
        "A saved report (report.json or its folder): judge its replies again with the judges given (the markers "
        "first), nothing generated; KL numbers are carried over. BASE is loaded only for --judge-llm base.",
        metavar="<report>",
        panel=opt.JUDGING,
    ),
    out: Path | None = opt.optional(
        "--out",
        "Report directory.",
        "runs/<base>/eval-<edit>; with --rejudge: <report folder>-rejudged",
        "<dir>",
        panel=opt.OUTPUT,
    ),
    force: bool = opt.FORCE,
    as_json: bool = opt.switch("--json", "Print only the JSON report on stdout.", panel=opt.OUTPUT),
    record: bool = opt.switch(
        "--record",
        "Write the summary into EDITED's refusal_edit.json and model card (refusal-edit checkpoints only).",
        panel=opt.OUTPUT,
    ),
    dtype: str = opt.DTYPE,
    device: str = opt.DEVICE,
    max_memory: str | None = opt.MAX_MEMORY,
    offload_dir: Path | None = opt.OFFLOAD_DIR,
    load_in: str | None = opt.LOAD_IN,
    allow_foreign_direction: bool = opt.switch(
        "--allow-foreign-direction",
        "Apply a --direction extracted from another model (an error otherwise).",
        panel=opt.INPUT,
    ),
    intervention: str | None = typer.Option(None, "--intervention", hidden=True, help="Old name of --mode."),
    n_old: int | None = typer.Option(None, "--n", hidden=True, help="Old name of --n-test."),
) -> None:
    """Compare BASE with an edited checkpoint (any tool's), or with a direction applied by hooks (nothing
    written): refusal rates per judge (harmful, harmless, borderline; per category), degenerate replies,
    judge agreement, first-token and multi-token KL, cross-entropy."""
    quiet_libraries()
    from refusal_edit.workflows import evaluation as workflow
    from refusal_edit.workflows.planning import edit_from_options

    skip_borderline = borderline is not None and borderline.strip().lower() == "none"
    judging = {
        "judges": ("markers", *(judge or ())),
        "judge_labels": judge_labels,
        "judge_llm": judge_llm,
        "judge_llm_mode": judge_llm_mode,
        "judge_llm_rubric": judge_llm_rubric,
    }
    if rejudge is not None:
        if edited is not None or direction is not None:
            raise RefusalEditError("`rejudge` judges a saved report again: drop EDITED and `direction`")
        settings, _ = workflow.eval_settings(batch_size, **judging)
        done = workflow.rejudge(
            rejudge, base, out=out, force=force, settings=settings, markers=markers, dtype=dtype, device=device
        )
        _show(done, as_json)
        return

    settings, auto = workflow.eval_settings(  # auto: the batch size chosen once the models are loaded
        batch_size,
        template_kwargs,
        reasoning_delimiters,
        n=n_old if n_old is not None else n_test,
        max_new_tokens=max_new_tokens,
        kl_tokens=kl_tokens,
        samples=samples,
        **judging,
        borderline=not skip_borderline,
    )
    done = workflow.run(
        base,
        edited,
        direction=direction,
        edit=edit_from_options(**opt.edit_options({**locals(), "mode": intervention or mode})),
        out=out,
        force=force,
        record=record,
        allow_foreign_direction=allow_foreign_direction,
        **opt.placement(dtype, device, max_memory, offload_dir),
        load_in=load_in,
        batch_size=auto,
        harmful=harmful,
        harmless=harmless,
        borderline=None if skip_borderline else borderline,
        settings=settings,
        markers=markers,
        **opt.chat(system_prompt, template),
    )
    _show(done, as_json)


def _show(done: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(done.json_text())
        sys.stdout.flush()
        return
    print_report(done.report)
    err.print(f"report: {escape(str(done.json_path))}  plot: {escape(str(done.png_path))}", soft_wrap=True)
    if done.recorded is not None:
        err.print(f"recorded the evaluation in {escape(str(done.recorded))} and README.md", soft_wrap=True)
