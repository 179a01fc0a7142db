"""Moved into the package: `refusal-edit confirm` (refusal_edit/workflows/confirm.py). This script stays so the
commands of earlier results pages run as they were written; it passes its options on unchanged.

    .venv/bin/python bench/confirm.py --direction D --points POINTS.json [--split train [--cross-fit]]
        [--kl-prompts 16] [--max-new-tokens 32] [--out OUT.json [--force]]   # [--model RECIPE]
"""

from __future__ import annotations

import sys

RECIPE = "qwen2.5-coder-0.5b-instruct"


def argv(args: list[str]) -> list[str]:
    """`refusal-edit confirm`'s arguments for this script's: `--model M` becomes MODEL (default: the demo)."""
    args = list(args)
    model = RECIPE
    if "--model" in args:
        i = args.index("--model")
        model = args[i + 1] if i + 1 < len(args) else model
        del args[i : i + 2]
    return ["confirm", model, "--device", "cpu", *args]


if __name__ == "__main__":
    from refusal_edit.entry import main

    sys.argv = ["refusal-edit", *argv(sys.argv[1:])]
    main()
