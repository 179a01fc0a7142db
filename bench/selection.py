"""Benchmark: default (fast) direction selection vs the exhaustive search, side by side.

Both selections run on the same model, refusal tokens, candidate directions and validation prompts
(32 + 32 by default). The exhaustive search scores every (position, layer) candidate in full on full
sequences, as the paper's code does; the default ranks candidates by a first-order proxy, scores only
the best few and reuses the chat template's shared prefix. Prints both times, their ratio, both chosen
candidates and how far the default's bypass score is from the exhaustive best.

    python bench/selection.py [--model qwen2.5-coder-0.5b-instruct] [--json bench/selection.json]

Targets (issue 2): default time <= exhaustive / 10 and bypass within 10 % of the exhaustive best.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--n-val", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("REFUSAL_EDIT_QUIET", "1")

    from refusal_edit.cli.app import quiet_libraries
    from refusal_edit.directions.candidates import generate_candidates
    from refusal_edit.directions.refusal_tokens import derive_refusal_tokens
    from refusal_edit.directions.select import Scorer, select_exhaustive, select_fast
    from refusal_edit.loading import load_model
    from refusal_edit.prompts import builtin, chat_format
    from refusal_edit.workflows import defaults

    quiet_libraries()
    source = defaults.resolve_model(args.model)
    lm = load_model(source)
    fmt = chat_format(lm.tokenizer, system=defaults.system_prompt(source, None))
    harmful, harmless = builtin("harmful"), builtin("harmless")
    h_train, s_train = harmful.split("train"), harmless.split("train")
    h_val = fmt.format_all(harmful.split("val").sample(args.n_val).instructions)
    s_val = fmt.format_all(harmless.split("val").sample(args.n_val).instructions)
    print(f"model {source.name}, {torch.get_num_threads()} CPU threads, {args.n_val}+{args.n_val} val prompts")

    start = time.perf_counter()
    tokens = derive_refusal_tokens(
        lm.model, lm.tokenizer, fmt, h_train.sample(32).instructions, s_train.sample(32).instructions
    )
    cands = generate_candidates(
        lm.model, lm.tokenizer, fmt, h_train.instructions, s_train.instructions, tokens.ids, args.batch_size
    )
    shared = time.perf_counter() - start
    print(f"shared steps (refusal tokens {tokens.strings}, candidates): {shared:.0f} s")

    settings = defaults.selection_settings(source, args.batch_size, {})
    print(f"filters: KL <= {settings.kl_threshold}, induce >= {settings.induce_threshold}")
    fast = select_fast(
        Scorer(lm.model, lm.tokenizer, h_val, s_val, tokens.ids, cands, args.batch_size, share_prefix=True),
        settings,
        lm.tokenizer,
        h_val,
    )
    print(f"default selection: {fast.seconds:.0f} s, {fast.evaluated} candidates scored")
    exhaustive = select_exhaustive(
        Scorer(lm.model, lm.tokenizer, h_val, s_val, tokens.ids, cands, args.batch_size, share_prefix=False),
        settings,
    )
    print(f"exhaustive selection: {exhaustive.seconds:.0f} s, {exhaustive.evaluated} candidates scored")

    best = exhaustive.chosen
    key = (fast.chosen.position, fast.chosen.layer)
    same = next(c for c in exhaustive.candidates if (c.position, c.layer) == key)
    gap = abs(same.bypass - best.bypass) / abs(best.bypass)
    ratio = fast.seconds / exhaustive.seconds
    ranked = sorted((c for c in fast.candidates if c.proxy is not None), key=lambda c: c.proxy)
    best_rank = next(i + 1 for i, c in enumerate(ranked) if (c.position, c.layer) == (best.position, best.layer))
    print()
    print(f"{'':12} {'seconds':>8} {'layer':>6} {'pos':>4} {'bypass':>8} {'induce':>8} {'KL':>7}")
    for name, sel, c in (("default", fast, same), ("exhaustive", exhaustive, best)):
        print(
            f"{name:12} {sel.seconds:>8.0f} {c.layer:>6} {c.position:>4} {c.bypass:>8.3f} {c.induce:>8.3f} {c.kl:>7.4f}"
        )
    print(f"time ratio default / exhaustive: {ratio:.3f} (target <= 0.100)")
    print(f"bypass gap to the exhaustive best: {100 * gap:.1f} % (target <= 10 %)")
    print(f"the exhaustive best is number {best_rank} of {len(ranked)} in the proxy ranking (top_k = {settings.top_k})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": source.name,
                    "threads": torch.get_num_threads(),
                    "shared_seconds": shared,
                    "default": {"seconds": fast.seconds, "chosen": asdict(fast.chosen), **fast.details},
                    "exhaustive": {"seconds": exhaustive.seconds, "chosen": asdict(best)},
                    "ratio": ratio,
                    "bypass_gap": gap,
                    "candidates": [asdict(c) for c in exhaustive.candidates],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
