"""How soon `refusal-edit chat` answers: time to the first token of each reply, once the model is loaded.

Loads MODEL (and EDITED, or MODEL under a hook edit with --direction) through the same `open_chat` the command
uses, then asks the first --n harmless test prompts, each in a new conversation, and reports per speaker the
time from the message to its first generated token (chat template and prefill included) and the generation
rate after it, and the CPU seconds (all threads) the process spent until that first token: on a shared machine
the wall time grows with the load, the CPU time hardly does, and CPU time / threads is what the same reply takes
on that many idle cores. Prints a table; --json writes every reply's numbers.

    python bench/chat.py [--model qwen2.5-coder-0.5b-instruct] [--direction runs/demo/direction]
                         [--n 8] [--max-new-tokens 32] [--threads 2] [--json chat.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from refusal_edit.prompts import builtin
from refusal_edit.workflows.chat import open_chat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--edited", default=None, help="a second model answering beside MODEL")
    ap.add_argument("--direction", default=None, help="MODEL under this edit as hooks answers beside MODEL")
    ap.add_argument("--n", type=int, default=8, help="harmless test prompts asked")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write every reply's numbers here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    chat = open_chat(args.model, args.edited, direction=args.direction, max_new_tokens=args.max_new_tokens)
    load_s = time.perf_counter() - t0
    prompts = builtin("harmless").split("test").instructions[: args.n]
    rows = []
    for prompt in prompts:
        chat.reset()
        for r in chat.ask(prompt):
            rate = (r.tokens - 1) / (r.seconds - r.first_token_s) if r.first_token_s and r.tokens > 1 else None
            rows.append({"prompt": prompt, "model": r.label, "tokens": r.tokens, "first_token_s": r.first_token_s,
                         "seconds": r.seconds, "tokens_per_s_after_first": rate,
                         "first_token_cpu_s": r.first_token_cpu_s})  # fmt: skip
            print(f"  {r.label}: first token {r.first_token_s:.2f} s ({r.first_token_cpu_s:.2f} CPU s), "
                  f"{r.tokens} tokens in {r.seconds:.1f} s", flush=True)  # fmt: skip
    print(f"loaded in {load_s:.1f} s; {len(prompts)} prompts, {args.max_new_tokens} new tokens at most, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'model':<48} {'first token: median':>20} {'max':>7} {'CPU s: median':>14} {'tokens/s after':>15}")
    for label in chat.labels:
        mine = [r for r in rows if r["model"] == label]
        first = [r["first_token_s"] for r in mine if r["first_token_s"] is not None]
        rates = [r["tokens_per_s_after_first"] for r in mine if r["tokens_per_s_after_first"]]
        cpu = statistics.median(r["first_token_cpu_s"] for r in mine if r["first_token_cpu_s"] is not None)
        print(f"{label:<48} {statistics.median(first):>18.2f} s {max(first):>5.2f} s {cpu:>12.2f} s "
              f"{statistics.median(rates):>15.1f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"load_s": load_s, "threads": args.threads, "replies": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
