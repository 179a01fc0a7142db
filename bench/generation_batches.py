"""How the batching of greedy generation changes its cost on this machine: the demo's evaluation sets (the
first --n prompts of the harmful, harmless and borderline test splits, chat-formatted) generated per set (one
call each, the batching `evaluate` used until 2026-12-07) and all three in one call, at several batch sizes,
side by side in one process; the first layout runs again last to show drift. Prints seconds, generated tokens
and how many replies equal the first layout's, token for token.

    python bench/generation_batches.py [--model qwen2.5-coder-0.5b-instruct] [--n 20] [--max-new-tokens 64]
                                      [--batch-sizes 32,64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from refusal_edit.generation import generate
from refusal_edit.loading import load_model
from refusal_edit.prompts import builtin
from refusal_edit.prompts.template import chat_format

KINDS = ("harmful", "harmless", "borderline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--n", type=int, default=20, help="prompts per set")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="32,64", help="batch sizes of the one-call layout")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    loaded = load_model(args.model)
    fmt = chat_format(loaded.tokenizer)
    sets = {k: fmt.format_all(builtin(k).split("test").sample(args.n).instructions) for k in KINDS}

    def per_set() -> list:
        return [
            g for k in KINDS for g in generate(loaded.model, loaded.tokenizer, sets[k], args.max_new_tokens, 32, None)
        ]

    def one_call(size: int):
        texts = [t for k in KINDS for t in sets[k]]
        return lambda: generate(loaded.model, loaded.tokenizer, texts, args.max_new_tokens, size, None)

    layouts = [("per set, batch 32", per_set)]
    layouts += [(f"one call, batch {b}", one_call(int(b))) for b in args.batch_sizes.split(",")]
    layouts.append(("per set, batch 32 (again)", per_set))
    rows, first = [], None
    for label, run in layouts:
        t = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t
        first = first or out
        same = sum(a.token_ids == b.token_ids for a, b in zip(first, out, strict=True))
        tokens = sum(len(g.token_ids) for g in out)
        rows.append({"layout": label, "seconds": round(seconds, 1), "tokens": tokens, "same_as_first": same})
        print(f"{label:<28} {seconds:7.1f} s  {tokens:5d} tokens  {same}/{len(out)} replies as the first", flush=True)
    threads = torch.get_num_threads()
    print(f"{args.model}, {len(first)} prompts, {args.max_new_tokens} new tokens at most, {threads} threads")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
