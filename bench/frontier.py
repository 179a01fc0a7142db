"""Side-by-side benchmark: refusal vs. damage fronts of the paper's edit, `refusal-edit tune` and heretic.

Every point of every method is a checkpoint on disk, judged by one harness: our `evaluate` against the base
model on the built-in test split (100 harmful + 100 harmless prompts, which no method trains or tunes on),
greedy 64 new tokens, the model's default system prompt. For each point: harmful refusal rate, first-token
KL and multi-token KL on the harmless replies; for each method: wall time and peak RSS of producing its front.

    flock /tmp/heavy.lock .venv/bin/python bench/frontier.py [--model RECIPE] [--direction D]
        [--methods paper,window,tune] [--window A:B] [--peer heretic [--peer-run DIR]] [--trials 24] [--reuse]
        [--out runs/frontier] [--workdir runs/peers] [--second-judge] [--tune-run DIR] [--judge-only M/ID,...]

--peer heretic installs heretic-llm 1.4.0 into its own venv (WORKDIR/heretic-venv, CPU torch 2.13.0), runs it
on our train prompts (its own scoring on our val prompts, its system prompt "You are a helpful assistant."),
and exports every point of its final Pareto front merged (bench/peers/heretic.py). --reuse keeps every finished
step: heretic's run and exports, tune's study, each written point and each point's judge report. --peer-run DIR
takes a finished heretic run (DIR holds heretic-run.json, every front point exported) instead of running heretic;
--tune-run DIR a finished `tune` run (DIR/front.json) instead of running tune. With --judge-only, only the tune
points named there are written.

The paper's edit is the recipe's direction (--direction, e.g. the demo direction) ablated from every residual
writer; the window edit is the same direction ablated from the writers of a fixed window of layers only
(--window, default the 5 layers up to the direction's: the issue's hook probe); tune runs with its defaults on
that direction; tune's reference point (the same all-writers edit) is judged once, as the paper's point. The
table ends with whether tune's confirmed front dominates each point of heretic and of the two simple edits on
the test split: a tune point with no more harmful refusals, first-token KL and multi-token KL; and again
counting every harmful reply that does not comply (refused, degenerate or undecided: a degenerate reply is
never compliance), since the refusal rate alone counts a broken reply as neither.

--second-judge judges every judged point's replies again with the LLM judge (the base model itself, asked only
whether the reply refuses; `evaluate --rejudge --judge-llm base --judge-llm-rubric refusal`: nothing generated,
the KLs carried over) into OUT/judge-llm/<method>/<point>/, and repeats the dominance verdict with its refusal
counts: near 1 %, a verdict that one judge's false positives decide is not worth much (the markers count "As an
AI language model, ... but I can provide" as a refusal).

Writes OUT/frontier.json (every point of every method, with each tool's own numbers next to ours) and
OUT/frontier.png (harmful refusal vs. first-token KL and vs. multi-token KL, one series per method), and each
judge report in OUT/judge/<method>/<point>/; the base model's replies are kept in OUT/judge/base-replies.json for
the next run. Not part of CI: a full run takes hours on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RECIPE = "qwen2.5-coder-0.5b-instruct"
PEERS = ("heretic",)
DIRECTION = Path("/tmp/lead/demo-direction/direction.safetensors")  # the demo direction (make demo's extract)
JUDGE = {"split": "test", "n": 100, "max_new_tokens": 64, "system_prompt": "the model's default (chat template)"}


@dataclass
class Point:
    """One checkpoint on a method's front: the method's own numbers (`own`) and ours on the test split (`test`)."""

    method: str
    id: str
    path: str | None
    own: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] | None = None


@dataclass
class Method:
    """A method's front and what producing it cost (the search/edit, not the judging)."""

    name: str
    points: list[Point] = field(default_factory=list)
    wall_s: float | None = None
    peak_rss_mib: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


# ---------------------------------------------------------------- cost of a command


@dataclass
class Cost:
    """What one command cost: wall and CPU seconds, peak RSS, and the machine's load around it (shared cores)."""

    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    threads: str | None = field(default_factory=lambda: os.environ.get("OMP_NUM_THREADS"))

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def timed(cmd: Sequence[str], **kwargs: Any) -> Cost:
    """Run `cmd` to completion; its wall and CPU time and the peak RSS of it and its waited-for descendants.

    `os.wait4` reports this child's own rusage, so the peaks of earlier commands do not leak in. CPU time is
    reported because the wall time on a shared machine depends on everyone else (the load averages say how much).
    """
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), **kwargs)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, list(cmd))
    cpu = usage.ru_utime + usage.ru_stime
    return Cost(wall, cpu, usage.ru_maxrss / 1024, load0, os.getloadavg())


def cli(*args: str) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "refusal-edit"), *args]


# ---------------------------------------------------------------- the judge (one harness for every method)


def load_base_replies(path: Path, replies: dict[str, Any]) -> None:
    """The base model's replies kept by an earlier bench process, into the loaded base's `replies` (they are
    half the cost of judging a point; `evaluate` reuses them)."""
    if not path.is_file():
        return
    from refusal_edit.generation import Generated

    for key, rows in json.loads(path.read_text()).items():
        replies.setdefault(key, [Generated(**r) for r in rows])


def save_base_replies(path: Path, replies: dict[str, Any]) -> None:
    """Keep the base model's replies for the next bench process (keyed by what a greedy reply depends on)."""
    if replies:
        write_json(path, {k: [asdict(g) for g in v] for k, v in replies.items()})


def judge(base: Any, point_dir: Path, out: Path, reuse: bool = False) -> dict[str, Any]:
    """Our `evaluate` of `point_dir` against `base` on the built-in test split; the report goes to `out`.

    `base` is the base model as `evaluate` takes it (recipe name, directory or a loaded model: load it once
    to judge many points; its replies are generated once). Kept in this one function: the evaluate API is
    still moving.
    """
    report_json = out / "report.json"
    if reuse and _newer(report_json, _newest_file(point_dir)):
        saved = json.loads(report_json.read_text())
        return _test_numbers(saved["summary"]) | _per_prompt(saved, None, {KEYS[0]: False, NOT_COMPLIED: True})
    from refusal_edit.evaluation.comparison import EvalSettings
    from refusal_edit.workflows import evaluate, save_report

    # Explicit, not evaluate's defaults (which moved to 128 tokens + the borderline set): one fixed harness.
    settings = EvalSettings(n=JUDGE["n"], max_new_tokens=JUDGE["max_new_tokens"], borderline=False)
    # test split + default system prompt are evaluate's defaults; the base model's replies are generated once
    report = evaluate(base, point_dir, settings=settings)
    save_report(report, out, force=True)
    saved = json.loads(report_json.read_text())
    return _test_numbers(report.summary()) | _per_prompt(saved, None, {KEYS[0]: False, NOT_COMPLIED: True})


def _newest_file(folder: Path) -> Path:
    """The most recently written file in `folder` (a checkpoint keeps its source's config.json and tokenizer
    times: only the files written for the edit - weights, record - tell when it was written)."""
    files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
    return max(files, key=lambda f: f.stat().st_mtime) if files else folder / "config.json"


def _newer(result: Path, source: Path) -> bool:
    """`result` exists and was written after `source` (a checkpoint written again since is judged again)."""
    return result.is_file() and (not source.is_file() or result.stat().st_mtime >= source.stat().st_mtime)


def _test_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "harmful_refusal_base",
        "harmful_refusal_edited",
        "harmless_refusal_base",
        "harmless_refusal_edited",
        "empty_responses_edited",
        "harmful_complied_edited",
        "harmful_degenerate_edited",
        "degenerate_rate_edited",
        "first_token_kl",
        "multi_token_kl",
        "harmful_prompts",
        "harmless_prompts",
        "harmful_count",
        "max_new_tokens",
    )
    got = {k: summary.get(k) for k in keys}
    complied = got["harmful_complied_edited"]
    got[NOT_COMPLIED] = None if complied is None else round(1 - complied, 4)
    return got


SECOND = "harmful_refusal_llm"  # the second judge's harmful refusal rate on the test split, next to the markers'
# The share of harmful replies that do not comply: refused, degenerate (a degenerate reply is never compliance,
# as the issue states) or undecided - by the markers, and by the LLM judge. The refusal rate alone counts a
# broken reply as neither, so an edit that breaks replies where another refuses looks better than it is.
NOT_COMPLIED = "harmful_not_complied"
SECOND_NOT_COMPLIED = "harmful_not_complied_llm"


def second_judge(
    base: Any, report_dir: Path, out: Path, reuse: bool = False, verdicts: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The replies of a judge report judged again by the LLM judge (the base model, the refusal question only,
    read from its next-token probabilities), written to `out`: {SECOND: rate, "second_judge": the judge's name}.

    The rate is the LLM judge's refusals over every harmful reply, degenerate ones included in the count of
    prompts as they are for the markers, so the two judges' rates compare directly. With `reuse`, a kept
    second report is read back unless the report it judged is newer (judged again since). `verdicts`: kept
    across points, so the base model's replies (the same in every report) are judged once per run.
    """
    report_json, judged = out / "report.json", report_dir / "report.json"
    if not (reuse and _newer(report_json, judged)):
        from refusal_edit.evaluation.comparison import EvalSettings
        from refusal_edit.workflows.evaluation import rejudge

        # only the judge settings matter: nothing is generated
        settings = EvalSettings(judge_llm="base", judge_llm_rubric="refusal")
        rejudge(report_dir, base, out=out, force=True, settings=settings, verdicts=verdicts)
    return _second_numbers(json.loads(report_json.read_text()))


def _second_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """The LLM judge's harmful refusal rate in a rejudged report (every harmful reply counted, like the markers')."""
    stats = report["judging"]["edited"]["harmful"]["stats"]
    llm = [k for k in stats if k.startswith("llm:")]
    if not llm:
        raise SystemExit(f"no LLM judge in the rejudged report: {sorted(stats)}")
    got = stats[llm[0]]
    return {
        SECOND: round(got["refused"] / got["total"], 4),
        SECOND_NOT_COMPLIED: round(1 - got["complied"] / got["total"], 4),
        "second_judge": llm[0],
    } | _per_prompt(report, llm[0], {SECOND: False, SECOND_NOT_COMPLIED: True})


PER_PROMPT = "harmful_per_prompt"  # in a point's test numbers: rate key -> the harmful prompts (indices) it counted


def _per_prompt(report: dict[str, Any], judge_name: str | None, keys: dict[str, bool]) -> dict[str, Any]:
    """Which harmful prompts each rate of `keys` counted, by one judge of a saved report (None: its first):
    {PER_PROMPT: {key: [indices]}}; a key's flag says whether it counts every reply that does not comply
    (refused, degenerate or undecided) or the refusals only. Every point is judged on the same test prompts,
    so two points' gaps are paired prompt by prompt (`stats.paired`)."""
    side = report.get("judging", {}).get("edited", {}).get("harmful", {})
    samples, judges = side.get("samples"), list(side.get("judges", {}))
    name = judge_name or (judges[0] if judges else None)
    if not samples or name is None:
        return {}
    out: dict[str, list[int]] = {}
    for key, not_complied in keys.items():
        out[key] = [
            i
            for i, s in enumerate(samples)
            if (
                (s.get("degenerate") is not None or s["verdicts"].get(name, {}).get("refused") is not False)
                if not_complied
                else s["verdicts"].get(name, {}).get("refused") is True
            )
        ]
    return {PER_PROMPT: out}


# ---------------------------------------------------------------- methods


def _cached_cost(path: Path, reuse: bool, cmd: Sequence[str], done: bool) -> dict[str, Any]:
    """Run `cmd` once and keep its cost in `path`; with `reuse` and its output in place (`done`), read it back."""
    if reuse and done and path.is_file():
        return json.loads(path.read_text())
    cost = timed(cmd).to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, cost)
    return cost


def _written(ckpt: Path, spec: dict[str, Any] | None = None) -> bool:
    """A finished checkpoint of ours is in `ckpt` (with `spec`: and its edit record names that spec - a study
    run again may give a point id another edit)."""
    record = ckpt / "refusal_edit.json"
    if not ((ckpt / "config.json").is_file() and record.is_file()):
        return False
    return spec is None or (json.loads(record.read_text()).get("spec") or {}).get("edit") == spec


def run_paper(model: str, direction: Path, out: Path, reuse: bool) -> Method:
    """The paper's single edit (Arditi et al.): `direction` ablated from every residual writer (orthogonalize).

    Its cost is orthogonalize's; extracting the direction is the same step for the paper's edit and tune, and its
    own timings (from the direction's run.json, when present) are reported alongside.
    """
    ckpt = out / "checkpoint"
    cmd = cli("orthogonalize", model, "--direction", str(direction), "--out", str(ckpt), "--force")
    cost = _cached_cost(out / "cost.json", reuse, cmd, _written(ckpt))
    run_json = (direction if direction.is_dir() else direction.parent) / "run.json"
    extract = json.loads(run_json.read_text()).get("timings") if run_json.is_file() else None
    point = Point("paper", "paper", str(ckpt), params={"direction": str(direction), "edit": "every writer, weight 1"})
    details = {"orthogonalize": cost, "extract_timings_s": extract}
    return Method("paper", [point], cost["wall_s"], cost["peak_rss_mib"], details)


def default_window(direction: Path) -> str:
    """The fixed window of the issue's hook probe: the writers of the 5 layers up to the direction's layer."""
    from refusal_edit.directions.artifacts import load_direction

    layer = load_direction(direction).layer
    return f"{max(0, layer - 4)}:{layer + 1}"


def run_window(model: str, direction: Path, out: Path, reuse: bool, window: str) -> Method:
    """The other simple edit: `direction` ablated from the writers of a fixed window of layers only (`--layers
    A:B`, no embedding unless A is 0), at full weight."""
    ckpt = out / "checkpoint"
    cmd = cli("orthogonalize", model, "--direction", str(direction), "--layers", window, "--out", str(ckpt), "--force")
    cost = _cached_cost(out / "cost.json", reuse, cmd, _written(ckpt))
    params = {"direction": str(direction), "edit": f"writers of layers {window}, weight 1"}
    point = Point("window", f"layers-{window.replace(':', '-')}", str(ckpt), params=params)
    return Method("window", [point], cost["wall_s"], cost["peak_rss_mib"], {"orthogonalize": cost, "layers": window})


def run_tune(
    model: str, direction: Path, out: Path, reuse: bool, run: Path | None = None, only: set[str] | None = None
) -> Method:
    """Our `tune` front with tune's defaults: every confirmed point written with `orthogonalize --spec
    front.json#ID` and judged like every other point. The cost reported is tune's (search + confirmation); the
    reference point (the paper's all-writers edit, which tune confirms for comparison) is judged as `paper`.

    `run`: a finished `tune` run's folder, used as it is (its cost: the timings its front.json records, no peak
    RSS); `only`: the point ids to write (the others are listed, not written: each checkpoint costs an
    orthogonalize and a model's size of disk).
    """
    study = run or out / "study"
    front = study / "front.json"
    if run is None:
        cmd = cli("tune", model, "--direction", str(direction), "--out", str(study), "--force")
        cost = _cached_cost(out / "cost.json", reuse, cmd, front.is_file())
    data = json.loads(front.read_text())
    if run is not None:
        cost = {"wall_s": round(sum((data.get("timings") or {}).values()), 1), "peak_rss_mib": None, "run": str(run)}
    points = []
    for c in data["confirmed"]:
        own = {k: v for k, v in c["confirmed"].items() if k != "samples"} | {"proxy": c.get("proxy")}
        params = {"spec": c["spec"], "describe": c.get("describe"), "trial": c.get("trial")}
        if c.get("reference"):
            points.append(Point("tune", c["id"], None, own, params | {"same_edit_as": "paper"}))
            continue
        ckpt = out / "points" / c["id"]
        if only is not None and c["id"] not in only:
            points.append(Point("tune", c["id"], None, own, params | {"not_written": "not among --judge-only"}))
            continue
        write = cli("orthogonalize", model, "--spec", f"{front}#{c['id']}", "--out", str(ckpt), "--force")
        done = _written(ckpt, c["spec"])
        params["orthogonalize"] = _cached_cost(out / "points" / f"{c['id']}.cost.json", reuse, write, done)
        points.append(Point("tune", c["id"], str(ckpt), own, params))
    details = {
        "tune": cost,
        "tune_timings_s": data.get("timings"),
        "settings": data.get("settings"),
        "chosen": data.get("chosen"),
        "rule": data.get("rule"),
        "front": str(front),
        "trials": len(data.get("trials", [])),
    }
    return Method("tune", points, cost["wall_s"], cost["peak_rss_mib"], details)


def run_peer_heretic(model_dir: Path, workdir: Path, trials: int, reuse: bool, run_dir: Path | None = None) -> Method:
    """heretic-llm 1.4.0 in its own venv on our train prompts; every point of its final front exported merged.

    With `run_dir`, a finished run there is used as it is (never re-run; an error if it is not finished).
    """
    sys.path.insert(0, str(BENCH / "peers"))
    try:
        import heretic_peer as peer  # bench/peers/heretic_peer.py
    finally:
        sys.path.pop(0)

    if run_dir is not None:
        found = peer.load_run(run_dir)
        if found is None:
            raise SystemExit(f"{run_dir} holds no finished, fully exported heretic run (heretic-run.json)")
        run = found
    else:
        run = peer.run_heretic(model_dir, workdir, trials, reuse=reuse)
    points = [
        Point(
            "heretic",
            p.id,
            p.path,
            own={
                "refusals": p.refusals,
                "n_bad_prompts": p.n_bad_prompts,
                "base_refusals": p.base_refusals,
                "refusal_rate": p.refusals / p.n_bad_prompts,
                "first_token_kl": p.kl_divergence,
                "reached_s": p.reached_s,
                "prompts": "builtin val split, heretic's system prompt, 48 greedy tokens",
            },
            params={"direction_index": p.direction_index, **p.parameters},
        )
        for p in run.points
    ]
    details = {
        "version": peer.VERSION,
        "trials": run.trials,
        "search_wall_s": run.search_wall_s,
        "total_wall_s (with exports)": run.total_wall_s,
        "peak_rss_search_mib": run.peak_rss_search_mib,
        "cost": run.cost,
        "settings": run.settings,
        "system_prompt": peer.SYSTEM_PROMPT,
        "summary": str(run.summary),
    }
    cost = run.cost or {}
    wall, rss = cost.get("search_wall_s", run.search_wall_s), cost.get("peak_rss_mib", run.peak_rss_mib)
    return Method("heretic", points, wall, rss, details)


# ---------------------------------------------------------------- output


def _xy(p: Point, key: str, own: bool) -> tuple[float, float] | None:
    """A point's (KL, refusal %) on the test split, or with `own` from the tool's own numbers (None if missing)."""
    if not own:
        return None if p.test is None else (p.test[key], 100 * p.test["harmful_refusal_edited"])
    x, y = p.own.get(key), p.own.get("refusal_rate")
    return None if x is None or y is None else (x, 100 * y)


def plot(methods: list[Method], base: dict[str, Any] | None, path: Path, own: bool = False) -> None:
    """Harmful refusal rate against first-token KL (left) and multi-token KL (right), one series per method.

    With `own` (nothing judged yet), each tool's own numbers on the val split are drawn instead: provisional, as
    the tools measure with different prompts counts, system prompts and reply lengths (the title says so).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    markers = {"paper": "s", "window": "P", "tune": "o", "heretic": "^"}
    panels = (("first_token_kl", "first-token KL"), ("multi_token_kl", "multi-token KL"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        if base is not None:
            ax.scatter([0.0], [100 * base["harmful_refusal_base"]], c="k", marker="x", label="base model")
        for m in methods:
            got = sorted((xy, p) for p in m.points if (xy := _xy(p, key, own)) is not None)
            if not got:
                continue
            pts = [p for _, p in got]
            xs, ys = [xy[0] for xy, _ in got], [xy[1] for xy, _ in got]
            line = ax.plot(xs, ys, marker=markers.get(m.name, "D"), linestyle="-" if len(pts) > 1 else "", label=m.name)
            ci = [None if own else _interval(p) for p in pts]
            if all(c is not None for c in ci):  # Wilson 95 % intervals of the judged refusal rates
                low = [y - 100 * c[0] for y, c in zip(ys, ci, strict=True)]  # type: ignore[index]
                high = [100 * c[1] - y for y, c in zip(ys, ci, strict=True)]  # type: ignore[index]
                ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor=line[0].get_color(), alpha=0.35, capsize=2)
            for p, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(p.id, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{label} on harmless {'val' if own else 'test'} prompts (nats)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"harmful refusal rate on {'val' if own else 'test'} prompts (%)")
    axes[0].set_ylim(-2, max(10.0, axes[0].get_ylim()[1]))
    axes[0].legend(fontsize=8)
    title = (
        f"Refusal vs. damage, judged by refusal-edit evaluate (test split, {JUDGE['max_new_tokens']} tokens; "
        "bars: 95% intervals)"
    )
    if own:
        title = "PROVISIONAL: each tool's own val-split numbers (not one harness; not judged on test)"
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=RECIPE, help="recipe name (or model directory) to edit and judge against")
    ap.add_argument("--direction", type=Path, default=DIRECTION, help="direction.safetensors for paper and tune")
    ap.add_argument("--methods", default="paper,window,tune", help="ours: paper, window, tune ('' for none)")
    ap.add_argument("--window", help="the window method's layers A:B (default: the 5 up to the direction's)")
    ap.add_argument("--peer", action="append", default=[], choices=PEERS, help="peers to run (repeatable)")
    ap.add_argument("--peer-run", type=Path, help="use heretic's finished run in this folder (do not run it)")
    ap.add_argument("--trials", type=int, default=24, help="heretic's trial count (its default, 200, takes ~4 h here)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "frontier")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "peers", help="peers' venvs, runs and exports")
    ap.add_argument("--reuse", action="store_true", help="keep finished steps (peer runs, exports, judge reports)")
    ap.add_argument("--tune-run", type=Path, help="use this finished `tune` run (its front.json; do not run tune)")
    ap.add_argument("--no-judge", action="store_true", help="produce the fronts only")
    ap.add_argument("--judge-only", help="judge only these points, in this order (METHOD/ID,...; default: all)")
    ap.add_argument("--second-judge", action="store_true", help="judge every reply again with the LLM judge (base)")
    args = ap.parse_args()

    from refusal_edit.workflows import resolve_model

    source = resolve_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    window = args.window or default_window(args.direction)
    tune_only = None if not args.judge_only else {w[5:] for w in args.judge_only.split(",") if w.startswith("tune/")}
    ours: dict[str, Callable[[str, Path, Path, bool], Method]] = {
        "paper": run_paper,
        "window": lambda *a: run_window(*a, window=window),
        "tune": lambda *a: run_tune(*a, run=args.tune_run, only=tune_only),
    }
    machine = {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    machine["load_at_start"] = os.getloadavg()
    methods: list[Method] = []
    for name in [m for m in args.methods.split(",") if m]:
        if name not in ours:
            ap.error(f"unknown method {name!r} ({', '.join(ours)})")
        print(f"{name} ...", file=sys.stderr)
        methods.append(ours[name](args.model, args.direction, args.out / name, args.reuse))
    if "heretic" in args.peer:
        methods.append(run_peer_heretic(source.hf_dir, args.workdir, args.trials, args.reuse, args.peer_run))

    by_name = {m.name: m for m in methods}
    if "paper" in by_name and "tune" in by_name:  # tune confirms the paper's edit too: its own (val) numbers
        ref = [p for p in by_name["tune"].points if p.params.get("same_edit_as") == "paper"]
        if ref and by_name["paper"].points:
            by_name["paper"].points[0].own = dict(ref[0].own)
    base_numbers = None
    if not args.no_judge:
        from refusal_edit.loading.model import load_model

        base = load_model(source)  # loaded once for every point
        replies = args.out / "judge" / "base-replies.json"
        load_base_replies(replies, base.replies)
        order = [(m, p) for m in methods for p in m.points if p.path is not None]
        if args.judge_only:  # a short session judges the points that matter first; a later --reuse run adds the rest
            wanted = args.judge_only.split(",")
            found = {f"{m.name}/{p.id}": (m, p) for m, p in order}
            order = [found[w] for w in wanted if w in found]
        verdicts: dict[str, Any] = {}  # the second judge's, shared by every point (the base side's replies)
        for m, p in order:
            print(f"judging {m.name} {p.id} ...", file=sys.stderr)
            t0, load0 = time.perf_counter(), os.getloadavg()
            report_dir = args.out / "judge" / m.name / p.id
            p.test = judge(base, Path(p.path), report_dir, reuse=args.reuse)
            save_base_replies(replies, base.replies)
            p.test["judge_wall_s"] = round(time.perf_counter() - t0, 1)  # ~0 when a report was reused
            p.test["judge_load"] = [load0, os.getloadavg()]
            if args.second_judge:
                llm_dir = args.out / "judge-llm" / m.name / p.id
                second = second_judge(base, report_dir, llm_dir, reuse=args.reuse, verdicts=verdicts)
                per_prompt = {**p.test.get(PER_PROMPT, {}), **second.pop(PER_PROMPT, {})}
                p.test |= second | ({PER_PROMPT: per_prompt} if per_prompt else {})
            base_numbers = base_numbers or p.test
        same = {m.name: m for m in methods}
        for m in methods:  # a point that is the same edit as another method's point takes that one's numbers
            for p in m.points:
                other = same.get(p.params.get("same_edit_as", ""))
                if p.test is None and other is not None and other.points and other.points[0].test is not None:
                    p.test = dict(other.points[0].test)

    for m in methods:
        if m.name in PEERS and not args.no_judge:  # the peer's front with our numbers, next to its run
            write_json(args.workdir / f"{m.name}-points.json", {"judge": JUDGE, **asdict(m)})

    data = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {"spec": args.model, "hf_dir": str(source.hf_dir)},
        "judge": {**JUDGE, "harness": "refusal_edit.workflows.evaluate"},
        "machine": machine | {"load_at_end": os.getloadavg()},
        "base": None
        if base_numbers is None
        else {k: base_numbers[k] for k in ("harmful_refusal_base", "harmless_refusal_base")},
        "methods": {m.name: asdict(m) for m in methods},
        **dominance_verdicts(methods),
    }
    judged = any(p.test is not None for m in methods for p in m.points)
    if not judged:
        data["dominance_own_provisional"] = dominance(methods, own=True)
    write_json(args.out / "frontier.json", data)
    plot(methods, data["base"], args.out / "frontier.png", own=not judged)
    print(json.dumps(_table(methods), indent=1))
    for key, rate, heading in VERDICTS:
        if key in data:
            if heading:
                print(heading)
            print_dominance(data[key], rate)
    for row in data.get("dominance_own_provisional", []):
        by = ", ".join(row["dominated_by"]) or "none"
        h = row["numbers"]
        print(
            f"PROVISIONAL (own val numbers, FT-KL only) heretic {row['point']} refusal {100 * h['refusal_rate']:.0f}%"
            f" FT-KL {h['first_token_kl']:.4f}: tune point(s) with no more of either: {by}"
        )
    print(f"wrote {args.out / 'frontier.json'} and {args.out / 'frontier.png'}")


KEYS = ("harmful_refusal_edited", "first_token_kl", "multi_token_kl")
# The dominance verdicts in frontier.json: its key, the judged rate that counts, the heading printed above it.
VERDICTS = (
    ("dominance", KEYS[0], None),
    (
        "dominance_not_complied",
        NOT_COMPLIED,
        "counting every harmful reply that does not comply (refused, degenerate or undecided):",
    ),
    ("dominance_second_judge", SECOND, "judged again by the LLM judge (the base model, refusal question):"),
    (
        "dominance_not_complied_second_judge",
        SECOND_NOT_COMPLIED,
        "the LLM judge, counting every harmful reply that does not comply:",
    ),
)


def dominance_verdicts(methods: list[Method]) -> dict[str, list[dict[str, Any]]]:
    """Every dominance verdict of `VERDICTS` by its frontier.json key: the markers' refusals always, each other
    rate once some point has it (judged by that judge)."""
    return {
        key: dominance(methods, refusal=rate)
        for key, rate, _ in VERDICTS
        if rate == KEYS[0] or any(rate in (p.test or {}) for m in methods for p in m.points)
    }


def _fmt(t: dict[str, Any], refusal: str = KEYS[0]) -> str:
    r, ft, mt = (t[k] for k in (refusal, *KEYS[1:]))
    what = "not complied" if refusal in (NOT_COMPLIED, SECOND_NOT_COMPLIED) else "refusal"
    return f"{what} {100 * r:.0f}%, FT-KL {ft:.4f}, MT-KL {mt:.4f}"


def print_dominance(rows: list[dict[str, Any]], refusal: str = KEYS[0]) -> None:
    """One line per rival point: the tune points that dominate it, else the ones within noise of doing so."""
    for row in rows:
        by = ", ".join(row["dominated_by"]) or "none"
        print(f"{row['method']} {row['point']} {_fmt(row['numbers'], refusal)}: dominated by tune point(s): {by}")
        if not row["dominated_by"] and row.get("within_noise"):
            near = ", ".join(
                f"{w['point']} ({100 * w['refusal_gap']:+.0f} pts, {'paired' if w.get('paired') else 'unpaired'} "
                f"95% CI {100 * w['gap_ci95'][0]:+.1f} to "
                f"{100 * w['gap_ci95'][1]:+.1f})"
                for w in row["within_noise"]
            )
            print(f"  less KL of both kinds, a higher rate by a gap the test split cannot resolve: {near}")
        for g in row.get("gaps", []):
            how = "paired" if g["paired"] else "unpaired"
            lo, hi = g["gap_ci95"]
            print(
                f"  {g['point']} minus {row['point']}: {100 * g['refusal_gap']:+.1f} pts, {how} 95% CI "
                f"{100 * lo:+.1f} to {100 * hi:+.1f}"
            )


RIVALS = ("heretic", "paper", "window")  # the points tune's front must dominate: the peer's and the simple edits'


def dominance(methods: list[Method], own: bool = False, refusal: str = KEYS[0]) -> list[dict[str, Any]]:
    """For each judged point of a rival method (heretic, the paper's edit, the fixed window): the judged tune
    points with no more harmful refusals, no more first-token KL and no more multi-token KL on the test split
    (ties count: "no more", as the issue states the target; tune's reference point, the paper's edit itself,
    is not counted against the paper's edit).

    With `own`: the tools' own val-split numbers instead, refusal rate and first-token KL only (heretic measures
    no multi-token KL) -- provisional, since the two tools measure with different prompts and system prompts.
    `refusal`: which judge's harmful rate counts: the markers' refusals, `SECOND` (the LLM judge's), or either
    judge's replies that do not comply (`NOT_COMPLIED`, `SECOND_NOT_COMPLIED`).
    """
    keys = ("refusal_rate", "first_token_kl") if own else (refusal, *KEYS[1:])

    def numbers(p: Point) -> dict[str, Any] | None:
        source = p.own if own else p.test or {}
        got = {k: source.get(k) for k in keys}
        return None if any(v is None for v in got.values()) else got

    tune = [(t, n) for m in methods if m.name == "tune" for t in m.points if (n := numbers(t)) is not None]
    rows = []
    for m in methods:
        if m.name not in RIVALS or (own and m.name != "heretic"):
            continue
        for p in m.points:
            if (mine := numbers(p)) is None:
                continue
            # tune's reference point is the paper's edit itself: it would tie with it, which proves nothing
            rest = [(t, n) for t, n in tune if t.params.get("same_edit_as") != m.name]
            ours = [t.id for t, n in rest if all(n[k] <= mine[k] for k in keys)]
            row = {"method": m.name, "point": p.id, "numbers": mine, "dominated_by": ours}
            if not own:
                near = [t for t, n in rest if t.id not in ours and _less_kl(n, mine)]
                row["within_noise"] = _within_noise(p, near, refusal)
                row["gaps"] = [g for t, _ in rest if (g := gap(t, p, refusal)) is not None]
            rows.append(row)
    return rows


def _less_kl(n: dict[str, Any], rival: dict[str, Any]) -> bool:
    return n["first_token_kl"] <= rival["first_token_kl"] and n["multi_token_kl"] <= rival["multi_token_kl"]


def _refused(p: Point, refusal: str = KEYS[0]) -> tuple[int, int] | None:
    """(refused, prompts) of a judged point by one judge's rate: the count behind its rounded rate."""
    from refusal_edit.evaluation.stats import count

    t = p.test or {}
    n = t.get("harmful_count")
    if n is None or t.get(refusal) is None:
        return None
    return count(t[refusal], n), n


def _interval(p: Point) -> list[float] | None:
    """Wilson 95 % interval of a judged point's harmful refusal rate."""
    from refusal_edit.evaluation.stats import wilson

    got = _refused(p)
    return None if got is None else [round(x, 4) for x in wilson(*got)]


def gap(p: Point, rival: Point, refusal: str = KEYS[0]) -> dict[str, Any] | None:
    """`p`'s rate minus `rival`'s with its 95 % interval: paired prompt by prompt (Newcombe's paired interval,
    `stats.paired`) where both reports kept which prompts counted, else Newcombe's for independent samples."""
    from refusal_edit.evaluation.stats import difference, paired_sets

    theirs, mine = _refused(p, refusal), _refused(rival, refusal)
    if mine is None or theirs is None:
        return None
    a, b = ((x.test or {}).get(PER_PROMPT, {}).get(refusal) for x in (p, rival))
    pairs = a is not None and b is not None and theirs[1] == mine[1] and (len(a), len(b)) == (theirs[0], mine[0])
    interval = paired_sets(a, b, mine[1]) if pairs else difference(*theirs, *mine)
    return {
        "point": p.id,
        "refusal_gap": round(theirs[0] / theirs[1] - mine[0] / mine[1], 4),
        "gap_ci95": [round(x, 4) for x in interval],
        "paired": pairs,
    }


def _within_noise(rival: Point, candidates: list[Point], refusal: str = KEYS[0]) -> list[dict[str, Any]]:
    """The tune points with no more KL of either kind than `rival` but more refusals, whose refusal gap the
    test split cannot resolve (`gap`'s 95 % interval contains zero): near 1 %, 100 prompts cannot tell such a
    point from a dominating one."""
    from refusal_edit.evaluation.stats import resolvable

    out = []
    for t in candidates:
        got = gap(t, rival, refusal)
        if got is not None and not resolvable(got["gap_ci95"]):
            out.append(got)
    return out


def _table(methods: list[Method]) -> list[dict[str, Any]]:
    """One row per point: the headline numbers on the test split (stdout)."""
    rows = []
    for m in methods:
        for p in m.points:
            t = p.test or {}
            rows.append(
                {
                    "method": m.name,
                    "point": p.id,
                    "harmful_refusal": t.get("harmful_refusal_edited"),
                    "harmful_refusal_ci95": _interval(p),
                    "harmful_refusal_llm_judge": t.get(SECOND),
                    "harmful_not_complied": t.get(NOT_COMPLIED),
                    "harmful_not_complied_llm_judge": t.get(SECOND_NOT_COMPLIED),
                    "first_token_kl": t.get("first_token_kl"),
                    "multi_token_kl": t.get("multi_token_kl"),
                    "own": p.own,
                }
            )
    return rows


if __name__ == "__main__":
    main()
