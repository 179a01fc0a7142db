"""Confirm edit points on more prompts than `tune` can afford: tune's own confirmer (greedy replies judged by
the markers, degenerate replies counted apart; first-token and multi-token KL on harmless prompts) on any split
of the prompt sets, every point in one run against the same base continuations.

Why: near the paper's edit the refusal rates are a few percent, and 32 (tune's val) or 100 (the test split)
harmful prompts cannot tell 1 % from 3 %. The 240 train prompts can, a little better; they are the prompts
the direction's means came from, the same for every point, so points compare fairly even if the rates are
optimistic.

    .venv/bin/python bench/confirm.py --direction D --points POINTS.json [--split train [--cross-fit]]
        [--kl-prompts 16] [--max-new-tokens 32] [--out OUT.json [--force]]

With `--cross-fit` (train split only) the comparison is fair to edits with more fitted directions: the train
prompts are split in two halves (alternate prompts); each half's candidates (difference in means, filtered as
`extract` filtered them, the chosen one at the direction's position and layer) make the edits judged on the
other half's harmful prompts, and the two halves' counts are pooled (KLs: the mean of the two). Without it,
each layer's own candidate is judged on the very prompts it was fitted to, which flatters the per-layer edits.

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


def line(label: str, m: dict[str, Any]) -> str:
    lo, hi = m["refusal_ci95"]
    mt = m["multi_token_kl"]
    return (
        f"{label:24s} refused {100 * m['refusal_rate']:5.1f} % (95% CI {100 * lo:.1f}-{100 * hi:.1f})  "
        f"degenerate {100 * m['degenerate_rate']:4.1f} %  first-token KL {m['first_token_kl']:.4f}  "
        f"multi-token KL {'-' if mt is None else f'{mt:.4f}'}"
    )


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
    ap.add_argument(
        "--cross-fit", action="store_true", help="candidates from one half of the train prompts, judged on the other"
    )
    ap.add_argument("--out", type=Path, help="write every point's numbers here (JSON)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = ap.parse_args()
    if args.cross_fit and args.split != "train":
        raise SystemExit("error: --cross-fit splits the train prompts; it needs --split train")
    check_out(args.out, args.points, args.force)

    from refusal_edit.directions.artifacts import load_direction
    from refusal_edit.directions.bank import load_bank
    from refusal_edit.edits.spec import DirectionBank, EditSpec
    from refusal_edit.loading.model import load_model
    from refusal_edit.prompts import chat_format
    from refusal_edit.tuning.confirm import Confirmer
    from refusal_edit.workflows import defaults

    points = load_points(args.points)
    bank, direction = load_bank(load_direction(defaults.expand(str(args.direction))))
    source = defaults.resolve_model(args.model, "auto")
    lm = load_model(source, dtype="auto", device="cpu")
    fmt = chat_format(lm.tokenizer, system=defaults.system_prompt(source, None))  # the model's default
    sets = defaults.extraction_prompts(source, None, None)
    harmful = sets["harmful"].split(args.split)
    harmless = sets["harmless"].split("val").sample(args.kl_prompts)
    print(f"{len(harmful)} harmful {args.split} prompts, {len(harmless)} harmless val prompts", file=sys.stderr)
    specs = {label: EditSpec.from_json(spec) for label, spec in points.items()}
    kl_texts = fmt.format_all(harmless.instructions)
    start = time.perf_counter()

    def measure(prompts: list[str], edit_bank: DirectionBank) -> dict[str, dict[str, Any]]:
        """Every point made from `edit_bank`, judged on the harmful `prompts` (numbers without samples)."""
        confirmer = Confirmer(
            lm.model, lm.tokenizer, prompts, fmt.format_all(prompts), kl_texts, args.max_new_tokens, args.batch_size
        )
        measured = confirmer.measure(list(specs.items()), edit_bank)
        return {
            label: {k: v for k, v in m.to_json().items() if k != "samples"}
            for label, m in zip(specs, measured, strict=True)
        }

    if not args.cross_fit:
        rows = measure(harmful.instructions, bank)
    else:
        from refusal_edit.directions.refusal_tokens import user_refusal_tokens
        from refusal_edit.errors import RefusalEditError
        from refusal_edit.tuning.crossfit import fold_banks, pooled
        from refusal_edit.workflows.tune import extract_settings

        ids = user_refusal_tokens(lm.tokenizer, json.loads(direction.metadata.get("refusal_tokens", "[]"))).ids
        harmless_train = sets["harmless"].split("train").instructions
        try:
            made = fold_banks(
                lm.model,
                lm.tokenizer,
                fmt,
                harmful.instructions,
                harmless_train,
                ids,
                bank.position,
                bank.layer,
                batch_size=args.batch_size,
                filter_train=bool(extract_settings(direction).get("filter_train", True)),
            )
        except RefusalEditError as exc:
            raise SystemExit(f"error: --cross-fit: {exc}") from None
        folds: dict[str, list[dict[str, Any]]] = {label: [] for label in specs}
        for k, fold in enumerate(made):
            print(
                f"half {k + 1}: candidates from {fold.fitted[0]} harmful / {fold.fitted[1]} harmless prompts, "
                f"judged on {len(fold.judged)}",
                file=sys.stderr,
            )
            for label, numbers in measure(fold.judged, fold.bank).items():
                folds[label].append(numbers)
        rows = {label: pooled(measured) for label, measured in folds.items()}
    for label, numbers in rows.items():
        print(line(label, numbers), flush=True)
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.out is not None:
        result = {
            "split": args.split,
            "cross_fit": args.cross_fit,
            "harmful": harmful.describe(),
            "harmless": harmless.describe(),
            "points": rows,
        }
        write_json(args.out, result)


if __name__ == "__main__":
    main()
