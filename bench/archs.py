"""Sweep: every causal-LM and image-text-to-text model type of the installed transformers, derived and edited.

For each type, in a forked child with a time limit, with the hand-written table disabled (so the table's own
types go through the derivation too): the type's default config -> a tiny instance -> derive -> verify
(`refusal_edit.derive`, timed) -> save the tiny model -> `refusal-edit orthogonalize` (the CLI, in-process)
-> load the result with the stock class -> compare with the original model under ablation hooks
(<= 1e-4 fp32) and check that no hidden state keeps a component along r. Multimodal wrappers are built
whole (tiny vision tower too) and loaded with the wrapper's class; the vision weights must come back byte
for byte.

Status: `exact` (all of it held), `refused` (the derivation said why, before touching weights: the
product's answer for that type), `failed` (anything else: a wrong edit would show here; none may be silent).

    python bench/archs.py [--types a,b,c | --sample] [--timeout 90] [--out runs/archs.json] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# The named families every sample includes (issue 29), and every table type.
NAMED = ["gemma4", "qwen3_5", "qwen3_5_moe", "llama4", "glm4_moe_lite", "minimax_m2", "nemotron_h", "kimi_linear"]
TOL = 1e-4


def all_types() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    out = {t: "causal" for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    for t in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        out.setdefault(t, "image-text")
    return sorted(out.items())


def sample_types() -> list[str]:
    from refusal_edit.arch import ARCHITECTURES

    return sorted(set(NAMED) | set(ARCHITECTURES))


def _cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from refusal_edit.cli import main

    sys.argv = ["refusal-edit", *args]
    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, buf.getvalue()


def _output(out: Any) -> Any:
    """Logits, or the last hidden state where the stock class has no head (mistral4's, evolla's)."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def one(model_type: str) -> dict[str, Any]:
    """Derive, verify, edit through the CLI and compare one type (runs in a child process)."""
    import torch
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    from refusal_edit.derive import derive_and_verify, register
    from refusal_edit.derive.probe import token_ids
    from refusal_edit.derive.shrink import tiny_model, tiny_wrapper
    from refusal_edit.directions.artifacts import save_direction
    from refusal_edit.errors import RefusalEditError
    from refusal_edit.interventions import ablation

    row: dict[str, Any] = {"type": model_type}
    try:
        config = AutoConfig.for_model(model_type)
    except Exception as exc:
        return {**row, "status": "refused", "reason": f"no default config ({type(exc).__name__})"}
    start = time.perf_counter()
    try:
        spec, figures = derive_and_verify(config)
    except RefusalEditError as exc:
        return {**row, "status": "refused", "reason": str(exc), "seconds": time.perf_counter() - start}
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return {
            **row,
            "status": "refused",
            "reason": f"tiny instance: {reason}",
            "seconds": time.perf_counter() - start,
        }
    row["seconds"] = time.perf_counter() - start
    row["verify"] = max(figures.values())
    register(config, spec)  # the CLI below reads it from this process's registry
    try:
        wrapper = spec.text_model_type is not None
        model = tiny_wrapper(config) if wrapper else tiny_model(config)
        ids = token_ids(200)
        hidden = int(model.config.get_text_config().hidden_size)
        r = torch.randn(hidden, generator=torch.Generator().manual_seed(5))
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "src", Path(tmp) / "out"
            model.save_pretrained(src)
            save_direction(Path(tmp) / "d.safetensors", r, {"layer": 1, "position": -1, "model": "tiny"})
            code, text = _cli("orthogonalize", str(src), "--direction", f"{tmp}/d.safetensors", "--out", str(out))
            if code != 0:
                return {**row, "status": "failed", "reason": "cli: " + text.strip().splitlines()[-1][:300]}
            r = r / r.norm()
            with torch.no_grad(), ablation(model, r):
                reference = _output(model(input_ids=ids, use_cache=False))
            edited = type(model).from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = _output(edited(input_ids=ids, use_cache=False))
            diff = float((logits - reference).abs().max()) / max(1.0, float(reference.abs().max()))
            row["diff"] = diff
            if diff > TOL:
                return {**row, "status": "failed", "reason": f"edited checkpoint differs from the hooks by {diff:.1e}"}
            if wrapper:
                changed = []
                for f in sorted(src.glob("*.safetensors")):
                    with safe_open(str(f), "pt") as a, safe_open(str(out / f.name), "pt") as b:
                        towers = [k for k in a.keys() if any(w in k for w in ("vision", "audio", "projector"))]
                        changed += [k for k in towers if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
                if changed:
                    return {**row, "status": "failed", "reason": f"tower tensor changed: {changed[0]}"}
    except Exception as exc:
        text = traceback.format_exception_only(type(exc), exc)[-1].strip()[:300]
        return {**row, "status": "failed", "reason": text}
    return {**row, "status": "exact", "reason": ""}


def _child(model_type: str, queue: Any) -> None:
    os.environ["REFUSAL_EDIT_NO_TABLE"] = "1"
    os.environ["REFUSAL_EDIT_QUIET"] = "1"
    queue.put(one(model_type))


def run(types: list[tuple[str, str]], timeout: float, log: Path | None = None) -> list[dict[str, Any]]:
    import torch  # noqa: F401 - imported once here, shared by every forked child
    import transformers  # noqa: F401
    from transformers import AutoConfig

    import refusal_edit.cli
    import refusal_edit.derive.build
    import refusal_edit.derive.verify  # noqa: F401
    from refusal_edit.arch import ARCHITECTURES
    from refusal_edit.derive import derive_and_verify

    derive_and_verify(AutoConfig.for_model("llama"))  # warm: the lazy imports every type shares

    ctx = mp.get_context("fork")
    rows = []
    for i, (model_type, kind) in enumerate(types):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(model_type, queue))
        start = time.perf_counter()
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            row = {"type": model_type, "status": "failed", "reason": f"timed out after {timeout:.0f} s"}
        else:
            row = queue.get() if not queue.empty() else {"type": model_type, "status": "failed", "reason": "crashed"}
        row |= {"kind": kind, "table": model_type in ARCHITECTURES, "wall": time.perf_counter() - start}
        rows.append(row)
        if log is not None:  # one line per type as it finishes: a long sweep's partial results survive
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        secs = row.get("seconds")
        took = f"{secs:.1f} s" if secs is not None else "-"
        print(
            f"[{i + 1}/{len(types)}] {model_type:28s} {row['status']:8s} {took:>8s}  {row['reason'][:110]}",
            file=sys.stderr,
            flush=True,
        )
    return rows


NOT_BUILT = ("tiny instance:", "cannot build", "no default config", "transformers has no model class")


def report(rows: list[dict[str, Any]]) -> str:
    import transformers

    counts = {s: sum(r["status"] == s for r in rows) for s in ("exact", "refused", "failed")}
    not_built = sum(r["status"] == "refused" and r["reason"].startswith(NOT_BUILT) for r in rows)
    times = sorted(r["seconds"] for r in rows if r["status"] == "exact" and r.get("seconds") is not None)
    lines = [
        f"transformers {transformers.__version__}: {len(rows)} model types: "
        f"{counts['exact']} exact, {counts['refused']} refused ({not_built} of them because no tiny instance "
        f"could be built from the default config), {counts['failed']} failed",
    ]
    if times:
        median = times[len(times) // 2]
        lines.append(
            f"derive + verify (exact types): median {median:.1f} s, max {times[-1]:.1f} s, ≤ 10 s: "
            f"{sum(t <= 10 for t in times)}/{len(times)}"
        )
    lines += ["", "| type | kind | table | status | derive+verify s | reason |", "|---|---|---|---|---|---|"]
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else ""
        reason = r["reason"].replace("|", "/").replace("\n", " ")[:160]
        lines.append(
            f"| `{r['type']}` | {r['kind']} | {'yes' if r['table'] else ''} | {r['status']} | {secs} | {reason} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: all)")
    parser.add_argument("--sample", action="store_true", help="the CI sample: the named families and the table")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per type")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here (and as JSON lines while it runs)")
    parser.add_argument("--report", type=Path, help="print the table of a saved run (its .json or .jsonl) and stop")
    args = parser.parse_args()
    if args.report:
        text = args.report.read_text()
        rows = json.loads(text) if args.report.suffix == ".json" else [json.loads(x) for x in text.splitlines()]
        print(report(rows))
        return
    kinds = dict(all_types())
    if args.types:
        names = args.types.split(",")
    elif args.sample:
        names = sample_types()
    else:
        names = list(kinds)
    unknown = [n for n in names if n not in kinds]
    if unknown:
        sys.exit(f"not a causal-LM or image-text-to-text model type: {', '.join(unknown)}")
    log = None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        log = args.out.with_suffix(".jsonl")
        log.unlink(missing_ok=True)
    rows = run([(n, kinds[n]) for n in names], args.timeout, log)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print(report(rows))
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
