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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

RECIPE = "qwen2.5-coder-0.5b-instruct"
T = TypeVar("T")


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


def halves(items: Sequence[T]) -> list[tuple[list[T], list[T]]]:
    """Two folds of alternate items, as (fitted on, judged on): every item is judged exactly once."""
    return [(list(items[f::2]), list(items[1 - f :: 2])) for f in (0, 1)]


def pooled(folds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The folds' numbers (`Confirmed.to_json()` without samples) as one point: counts summed over every
    judged prompt, the KLs (measured on the same harmless prompts in each fold) averaged."""
    from refusal_edit.evaluation.stats import count, wilson

    n = sum(f["prompts"] for f in folds)
    refused = sum(count(f["refusal_rate"], f["prompts"]) for f in folds)
    degenerate = sum(count(f["degenerate_rate"], f["prompts"]) for f in folds)
    mt = [f["multi_token_kl"] for f in folds]
    return {
        "refusal_rate": refused / n,
        "degenerate_rate": degenerate / n,
        "complied_rate": (n - refused - degenerate) / n,
        "first_token_kl": sum(f["first_token_kl"] for f in folds) / len(folds),
        "multi_token_kl": None if None in mt else sum(mt) / len(mt),
        "prompts": n,
        "refused": refused,
        "degenerate": degenerate,
        "refusal_ci95": [round(x, 4) for x in wilson(refused, n)],
        "seconds": sum(f["seconds"] for f in folds),
        "folds": list(folds),
    }


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
    from refusal_edit.edits.spec import DirectionBank, EditSpec, resolve
    from refusal_edit.loading.model import load_model
    from refusal_edit.prompts import chat_format
    from refusal_edit.tuning.confirm import Confirmer
    from refusal_edit.workflows import sources

    points = load_points(args.points)
    bank, direction = load_bank(load_direction(sources.expand(str(args.direction))))
    source = sources.resolve_model(args.model, "auto")
    lm = load_model(source, dtype="auto", device="cpu")
    fmt = chat_format(lm.tokenizer, system=sources.system_prompt(source, None))  # the model's default
    sets = sources.extraction_prompts(source, None, None)
    harmful = sets["harmful"].split(args.split)
    harmless = sets["harmless"].split("val").sample(args.kl_prompts)
    print(f"{len(harmful)} harmful {args.split} prompts, {len(harmless)} harmless val prompts", file=sys.stderr)
    n_layers = int(lm.model.config.get_text_config().num_hidden_layers)
    specs = {label: EditSpec.from_json(spec) for label, spec in points.items()}
    kl_texts = fmt.format_all(harmless.instructions)
    start = time.perf_counter()

    def measure(prompts: list[str], edit_bank: DirectionBank) -> dict[str, dict[str, Any]]:
        """Every point made from `edit_bank`, judged on the harmful `prompts` (numbers without samples)."""
        confirmer = Confirmer(
            lm.model, lm.tokenizer, prompts, fmt.format_all(prompts), kl_texts, args.max_new_tokens, args.batch_size
        )
        resolved = [(label, resolve(spec, edit_bank, n_layers)) for label, spec in specs.items()]
        measured = confirmer.measure(resolved)
        return {
            label: {k: v for k, v in m.to_json().items() if k != "samples"}
            for (label, _), m in zip(resolved, measured, strict=True)
        }

    if not args.cross_fit:
        rows = measure(harmful.instructions, bank)
    else:
        from refusal_edit.directions.bank import bank_from_candidates
        from refusal_edit.directions.candidates import generate_candidates
        from refusal_edit.directions.refusal_tokens import user_refusal_tokens

        if bank.position is None or bank.layer is None:
            raise SystemExit("error: --cross-fit needs the direction's position and layer (an extract run's direction)")
        ids = user_refusal_tokens(lm.tokenizer, json.loads(direction.metadata.get("refusal_tokens", "[]"))).ids
        run_json = (direction.path.parent / "run.json") if direction.path is not None else None
        settings = json.loads(run_json.read_text()).get("settings", {}) if run_json and run_json.is_file() else {}
        harmless_train = sets["harmless"].split("train").instructions
        folds: dict[str, list[dict[str, Any]]] = {label: [] for label in specs}
        for k, ((fit_h, held_h), (fit_s, _)) in enumerate(
            zip(halves(harmful.instructions), halves(harmless_train), strict=True)
        ):
            cands = generate_candidates(
                lm.model,
                lm.tokenizer,
                fmt,
                fit_h,
                fit_s,
                ids,
                batch_size=args.batch_size,
                filter_train=bool(settings.get("filter_train", True)),
            )
            fold_bank = bank_from_candidates(cands, bank.position, bank.layer)
            print(
                f"half {k + 1}: candidates from {cands.harmful.count_kept if cands.filtered else len(fit_h)} harmful / "
                f"{cands.harmless.count_kept if cands.filtered else len(fit_s)} harmless prompts, "
                f"judged on {len(held_h)}",
                file=sys.stderr,
            )
            for label, numbers in measure(held_h, fold_bank).items():
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
