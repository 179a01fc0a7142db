"""Confirm edit points on more prompts than `tune` can afford: tune's own confirmer (greedy replies judged by
the markers, degenerate replies counted apart; first-token and multi-token KL on harmless prompts) on any split
of the prompt sets, every point in one run against the same base continuations.

Why: near the paper's edit the refusal rates are a few percent, and 32 (tune's val) or 100 (the test split)
harmful prompts cannot tell 1 % from 3 %. The 240 train prompts can, a little better; they are the prompts
the direction's means came from, the same for every point, so points compare fairly even if the rates are
optimistic.

    .venv/bin/python bench/confirm.py --direction D --points POINTS.json [--split train] [--kl-prompts 16]
        [--max-new-tokens 32] [--out OUT.json [--force]]

POINTS.json maps a label to an edit spec (the `spec` of a front.json point; `{}` is the paper's edit), or is a
front.json whose confirmed points are all taken. Prints one line per point; writes OUT.json whole (temporary
file, then rename), never over POINTS.json, and over an existing file only with --force. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

RECIPE = "qwen2.5-coder-0.5b-instruct"


def load_points(path: Path) -> dict[str, dict[str, Any]]:
    """label -> spec JSON, from a label map or from a front.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read --points {path}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("confirmed"), list):
        return {p["id"]: p["spec"] for p in data["confirmed"]}
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise SystemExit(f"error: {path}: expected {{label: spec}} or a front.json")
    return data


def check_out(out: Path | None, points: Path, force: bool) -> None:
    """Refuse, before any work, an `out` that would overwrite the points file (or what a symlink to it names)
    or, without `force`, any other existing file; an existing directory is never a valid `out`."""
    if out is None:
        return
    if out.is_dir():
        raise SystemExit(f"error: --out {out} is a directory; give a .json file")
    if out.exists() and points.exists() and out.samefile(points):
        raise SystemExit(f"error: --out {out} is the --points file; give another file")
    if out.exists() and not force:
        raise SystemExit(f"error: --out {out} exists (--force replaces it)")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON at `path`, whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=RECIPE)
    ap.add_argument("--direction", type=Path, required=True, help="direction.safetensors (or its run folder)")
    ap.add_argument("--points", type=Path, required=True, help="{label: spec} JSON, or a front.json")
    ap.add_argument("--split", default="train", choices=["train", "val", "test"], help="harmful prompts' split")
    ap.add_argument("--kl-prompts", type=int, default=16, help="harmless val prompts for the KL")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, help="write every point's numbers here (JSON)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = ap.parse_args()
    check_out(args.out, args.points, args.force)

    from refusal_edit.directions.artifacts import load_direction
    from refusal_edit.directions.bank import load_bank
    from refusal_edit.edits.spec import EditSpec, resolve
    from refusal_edit.loading.model import load_model
    from refusal_edit.prompts import chat_format
    from refusal_edit.tuning.confirm import Confirmer
    from refusal_edit.workflows import sources

    points = load_points(args.points)
    bank, _ = load_bank(load_direction(sources.expand(str(args.direction))))
    source = sources.resolve_model(args.model, "auto")
    lm = load_model(source, dtype="auto", device="cpu")
    fmt = chat_format(lm.tokenizer, system=sources.system_prompt(source, None))  # the model's default
    sets = sources.extraction_prompts(source, None, None)
    harmful = sets["harmful"].split(args.split)
    harmless = sets["harmless"].split("val").sample(args.kl_prompts)
    print(f"{len(harmful)} harmful {args.split} prompts, {len(harmless)} harmless val prompts", file=sys.stderr)
    confirmer = Confirmer(
        lm.model,
        lm.tokenizer,
        harmful.instructions,
        fmt.format_all(harmful.instructions),
        fmt.format_all(harmless.instructions),
        args.max_new_tokens,
        args.batch_size,
    )
    n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
    resolved = [(label, resolve(EditSpec.from_json(spec), bank, n_layers)) for label, spec in points.items()]
    start = time.perf_counter()
    measured = confirmer.measure(resolved)
    rows = {}
    for (label, _), m in zip(resolved, measured, strict=True):
        rows[label] = {k: v for k, v in m.to_json().items() if k != "samples"}
        print(
            f"{label:24s} refused {100 * m.refusal_rate:5.1f} % (95% CI {100 * m.refusal_ci95[0]:.1f}-"
            f"{100 * m.refusal_ci95[1]:.1f})  degenerate {100 * m.degenerate_rate:4.1f} %  "
            f"first-token KL {m.first_token_kl:.4f}  multi-token KL {m.multi_token_kl:.4f}",
            flush=True,
        )
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.out is not None:
        result = {"split": args.split, "harmful": harmful.describe(), "harmless": harmless.describe(), "points": rows}
        write_json(args.out, result)


if __name__ == "__main__":
    main()
