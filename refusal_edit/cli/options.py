"""Options several commands share, declared once: the same name, help and default everywhere.

Defaults are written one way: `[default: X]` for a fixed value, `[default: (what decides it)]` where a
recipe or the model decides (Click's notation for a described default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

MODEL_HELP = "HF directory, .gguf file, recipe name or .toml file, or Hub id (ORG/NAME)."

# The panels options are grouped in, in every command's help (in this order where a command has several).
INPUT = "Input"
EDIT = "Edit"
SEARCH = "Search"
JUDGING = "Judging"
DEVICES = "Devices"
OUTPUT = "Output"
PANELS = (INPUT, EDIT, SEARCH, JUDGING, DEVICES, OUTPUT)

DTYPE = typer.Option(
    "auto",
    help="Load dtype: auto|float32|bfloat16|float16 (auto: float32 on CPU, bfloat16 when float32 would not fit; "
    "the checkpoint's own on GPU).",
    rich_help_panel=DEVICES,
)
DEVICE = typer.Option(
    "auto",
    help="auto|cpu|cuda|mps (auto: CUDA, then Apple MPS, then the CPU, said on stderr; on CUDA or the CPU "
    "accelerate places the layers over the GPUs, then the CPU, then disk).",
    rich_help_panel=DEVICES,
)
BATCH_SIZE = typer.Option(
    "32",
    help="Prompts per forward / generation batch, or auto: the largest that fits in free memory.",
    rich_help_panel=DEVICES,
)
MAX_MEMORY = typer.Option(
    None,
    "--max-memory",
    help="With --device auto: memory for weights per device, accelerate's syntax (cpu=16GiB,cuda:0=70GiB); "
    "devices not named get none, the rest goes to disk.",
    show_default="the free memory",
    metavar="<dev=size,...>",
    rich_help_panel=DEVICES,
)
OFFLOAD_DIR = typer.Option(
    None,
    "--offload-dir",
    help="With --device auto: folder for offloaded weights that must be rewritten (safetensors weights are read "
    "in place).",
    show_default="<cache>/offload",
    metavar="<dir>",
    rich_help_panel=DEVICES,
)
LOAD_IN = typer.Option(
    None,
    "--load-in",
    help="4bit|8bit: quantize the linear layers with bitsandbytes while loading (the extra refusal-edit\\[quant]), "
    "for a model that does not fit in bf16; the whole model on the picked device. The direction comes from the "
    "quantized model; orthogonalize always edits the full-precision weights.",
    show_default="full precision",
    metavar="4bit|8bit",
    rich_help_panel=DEVICES,
)
SYSTEM_PROMPT = typer.Option(
    None,
    "--system-prompt",
    help="System prompt.",
    show_default="the recipe's, else the chat template's own",
    rich_help_panel=INPUT,
)
TEMPLATE = typer.Option(
    None,
    "--template",
    help="Jinja chat template for models without one.",
    show_default="the tokenizer's",
    metavar="<file>",
    rich_help_panel=INPUT,
)
MODE = typer.Option(
    "ablate",
    "--mode",
    help="ablate: remove the direction from every residual writer; add: add a vector.",
    rich_help_panel=EDIT,
)
COEFF = typer.Option(1.0, help="add: multiple of the vector (+1 induces refusal, -1 bypasses).", rich_help_panel=EDIT)
LAYER = typer.Option(None, help="add: the layer.", show_default="the direction's layer", rich_help_panel=EDIT)
SITE = typer.Option(
    None,
    help="add: input (of --layer) or attn (after --layer's attention).",
    show_default="input",
    rich_help_panel=EDIT,
)
UNIT = typer.Option(False, "--unit", help="add: add the unit direction instead of mean_diff.", rich_help_panel=EDIT)
DIRECTION = typer.Option(
    ...,
    "--direction",
    help="direction.safetensors (or its run folder) written by extract.",
    metavar="<file>",
    rich_help_panel=INPUT,
)
FORCE = typer.Option(
    False, "--force", help="Replace an existing output (a previous output of this tool).", rich_help_panel=OUTPUT
)
REPLACE_ANY = typer.Option(
    False,
    "--replace-any",
    help="With --force: replace an existing folder even if refusal-edit did not write it.",
    rich_help_panel=OUTPUT,
)
# The edit variants (orthogonalize, chat): a tune front point, or the options that describe one.
SPEC = typer.Option(
    None,
    "--spec",
    help="A tune front point: DIR/front.json[#ID]; without #ID, the front's picked point.",
    metavar="<front>",
    rich_help_panel=INPUT,
)
LAYERS = typer.Option(
    None,
    "--layers",
    help="Ablate only the writers of layers A:B (the embedding only from layer 0).",
    metavar="A:B",
    rich_help_panel=EDIT,
)
WEIGHT = typer.Option(
    None,
    "--weight",
    help="Partial ablation: remove this fraction of the direction.",
    show_default="1",
    rich_help_panel=EDIT,
)
PER_LAYER = typer.Option(
    False, "--per-layer", help="Each layer's writers lose that layer's own candidate direction.", rich_help_panel=EDIT
)
PROJECTED = typer.Option(
    False, "--projected", help="Remove the direction's component along the harmless mean first.", rich_help_panel=EDIT
)
RANK = typer.Option(1, help="Ablate the span of this many orthonormalised candidates.", rich_help_panel=EDIT)
BASIS = typer.Option(
    "positions", help="rank > 1: the other candidates at other positions|layers.", rich_help_panel=EDIT
)
PRESERVE_NORM = typer.Option(
    False, "--preserve-norm", help="Rescale every written vector to its original norm (exact).", rich_help_panel=EDIT
)
TEMPLATE_KWARGS = typer.Option(
    None,
    "--template-kwargs",
    help="Chat-template keyword arguments K=V (repeatable), e.g. enable_thinking=false; recorded.",
    metavar="K=V",
    rich_help_panel=INPUT,
)

# \[: not markup
PROMPT_FORMS = (
    r"builtin:NAME, a file (txt/json/jsonl/csv/parquet; FILE@test: its held-out part) or hf:NAME\[@SPLIT]\[#COL]"
)
SPLIT_NOTE = (
    " A set without a split column is split 70/15/15 (train/val/test) by a hash of each prompt: extract uses train "
    "and val; evaluate FILE@test measures on the held-out part."
)


def prompts(kind: str, default: str, more: str = "") -> Any:
    """--harmful / --harmless / --borderline: the same forms everywhere; `default` says which split is used."""
    return typer.Option(
        None, help=f"{kind} prompts: {PROMPT_FORMS}.{more}", show_default=default, rich_help_panel=INPUT
    )


def optional(flag: str, help: str, shown: str | bool = True, metavar: str = "<file>", panel: str | None = None) -> Any:
    """An option that is None unless given; `shown` says what decides it otherwise."""
    return typer.Option(None, flag, help=help, show_default=shown, metavar=metavar, rich_help_panel=panel)


def switch(flag: str, help: str, panel: str | None = None) -> Any:
    """An on/off flag, off by default."""
    return typer.Option(False, flag, help=help, rich_help_panel=panel)


# The parameters of a command that describe its edit: read into one value (`workflows.planning.edit_from_options`).
EDIT_OPTIONS = (
    "spec",
    "mode",
    "coeff",
    "layer",
    "site",
    "unit",
    "layers",
    "weight",
    "per_layer",
    "projected",
    "rank",
    "basis",
    "preserve_norm",
)


def edit_options(values: dict[str, Any]) -> dict[str, Any]:
    """The edit options among a command's parameter values (its `locals()`), by name, as the workflows read them."""
    return {name: values[name] for name in EDIT_OPTIONS if name in values}


def placement(dtype: str, device: str, max_memory: str | None, offload_dir: Path | None) -> dict[str, Any]:
    """Where a model's layers go: the same four options of extract, tune and evaluate, as the workflows take them."""
    return {"dtype": dtype, "device": device, "max_memory": max_memory, "offload_dir": offload_dir}


def chat(system_prompt: str | None, template: Path | None) -> dict[str, Any]:
    """The chat format's options, as the workflows take them."""
    return {"system_prompt": system_prompt, "template": template}
