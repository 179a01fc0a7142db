"""Presenting an `EvalReport`: rich tables, `report.json`, a PNG plot, and the checkpoint's record."""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from refusal_edit.checkpoint.card import RECORD, read_record, render_card
from refusal_edit.errors import RefusalEditError
from refusal_edit.evaluation.metrics import RefusalStats
from refusal_edit.evaluation.run import KINDS, EvalReport

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _clip(text: str, width: int = 160) -> Text:
    flat = " ".join(text.split())
    return Text(flat if len(flat) <= width else flat[: width - 1] + "…")


def tables(report: EvalReport) -> list[Table]:
    """The terminal view: refusal rates, divergences, per-category rates and sample responses."""
    label = _edited_label(report)
    sources = ", ".join(f"{k}: {report.prompts[k]['source']}" for k in KINDS)
    rates = Table(title=f"refusal rate: {report.base['name']} vs {label}", caption=Text(sources))
    for col in ("prompts", "n", "base", "edited", "change", "empty (base / edited)"):
        rates.add_column(col, justify="left" if col == "prompts" else "right")
    for kind in KINDS:
        b, e = report.refusal["base"][kind], report.refusal["edited"][kind]
        rates.add_row(
            "harmless (induced)" if kind == "harmless" and _induces(report) else kind,
            str(b.overall.total),
            _pct(b.rate),
            _pct(e.rate),
            f"{100 * (e.rate - b.rate):+.1f} pts",
            f"{b.empty} / {e.empty}",
        )

    d = report.divergence
    div = Table(
        title="divergence on harmless prompts (base greedy continuation, teacher-forced)",
        caption=f"{d.skipped_empty} prompts with an empty continuation skipped for multi-token KL and CE; "
        f"{d.tokens} continuation tokens",
    )
    for col in ("first-token KL", "multi-token KL", "CE base", "CE edited", "PPL base", "PPL edited", "prompts"):
        div.add_column(col, justify="right")
    div.add_row(
        _f(d.first_token_kl, 5),
        _f(d.multi_token_kl, 5),
        _f(d.base_ce),
        _f(d.edited_ce),
        _f(d.base_ppl, 3),
        _f(d.edited_ppl, 3),
        f"{d.scored}/{d.prompts}",
    )

    out = [rates, div]
    if any(report.refusal["base"][k].per_category for k in KINDS):
        cats = Table(title="refusal rate per category")
        for col in ("prompts", "category", "n", "base", "edited"):
            cats.add_column(col, justify="left" if col in ("prompts", "category") else "right")
        for kind in KINDS:
            b, e = report.refusal["base"][kind], report.refusal["edited"][kind]
            for cat, rc in b.per_category.items():
                cats.add_row(kind, Text(cat), str(rc.total), _pct(rc.rate), _pct(e.per_category[cat].rate))
        out.append(cats)

    if report.samples:
        samples = Table(title="sample responses (greedy)", show_lines=True, expand=True)
        samples.add_column("prompt", ratio=2)
        samples.add_column("base", ratio=3)
        samples.add_column("edited", ratio=3)
        for s in report.samples:
            head = Text(f"[{s.kind}{'/' + s.category if s.category else ''}] ", style="bold")
            samples.add_row(
                head + _clip(s.instruction),
                _clip(s.base) + Text(" (refusal)" if s.base_refusal else "", style="red"),
                _clip(s.edited) + Text(" (refusal)" if s.edited_refusal else "", style="red"),
            )
        out.append(samples)
    return out


def print_report(report: EvalReport, console: Console) -> None:
    for table in tables(report):
        console.print(table)


def _induces(report: EvalReport) -> bool:
    """An addition with a positive coefficient is meant to make the model refuse harmless prompts."""
    e = report.edited
    kind, coeff = (e.get("kind"), e.get("coeff")) if e.get("type") == "intervention" else _edit_mode(e)
    return kind == "add" and coeff is not None and float(coeff) > 0


def _edit_mode(edited: dict[str, Any]) -> tuple[Any, Any]:
    edit = edited.get("edit") or {}
    return edit.get("mode"), edit.get("coeff")


def _edited_label(report: EvalReport) -> str:
    e = report.edited
    if e.get("type") == "intervention":
        extra = f", coeff {e['coeff']:g}, layer {e['layer']}" if e.get("kind") == "add" else ""
        return f"{e.get('kind')} hook{extra}"
    return str(e.get("name", "edited"))


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: such values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def report_json(report: EvalReport) -> str:
    return json.dumps(_finite(report.to_dict()), indent=2, ensure_ascii=False) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RefusalEditError(f"cannot write {path}: {exc}") from exc


def _category_rates(stats: RefusalStats) -> dict[str, float]:
    return {c: rc.rate for c, rc in stats.per_category.items()} or {"all": stats.rate}


def plot_report(report: EvalReport, path: Path) -> Path:
    """Refusal rate against KL (base at 0, edited at its KL) and per-category refusal bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax0, ax1, ax2 = fig.subplots(1, 3, width_ratios=[1, 1.4, 1.4])
    d = report.divergence
    colours = {"harmful": "tab:red", "harmless": "tab:blue"}
    for kind in KINDS:
        b, e = report.rate("base", kind), report.rate("edited", kind)
        c = colours[kind]
        ax0.scatter([0.0], [b], color=c, marker="s", label=f"{kind}, base")
        ax0.scatter([d.first_token_kl], [e], color=c, marker="^", facecolors="none", label=f"{kind}, first-token KL")
        if d.multi_token_kl is not None:
            ax0.scatter([d.multi_token_kl], [e], color=c, marker="o", label=f"{kind}, multi-token KL")
            ax0.annotate("", (d.multi_token_kl, e), (0.0, b), arrowprops={"arrowstyle": "->", "color": c})
    ax0.set_xlabel("KL(base || edited), harmless prompts (nats)")
    ax0.set_ylabel("refusal rate")
    ax0.set_ylim(-0.05, 1.05)
    ax0.set_title("refusal vs KL")
    ax0.legend(fontsize=7)
    for ax, kind in ((ax1, "harmful"), (ax2, "harmless")):
        base = _category_rates(report.refusal["base"][kind])
        edited = _category_rates(report.refusal["edited"][kind])
        names = list(base)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [base[n] for n in names], width=0.4, label="base", color="tab:gray")
        ax.bar([x + 0.2 for x in xs], [edited[n] for n in names], width=0.4, label="edited", color=colours[kind])
        ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("refusal rate")
        ax.set_title(f"{kind} prompts per category (n={report.prompts[kind]['count']})")
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.base['name']} vs {_edited_label(report)}")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_report(report: EvalReport, out: Path) -> tuple[Path, Path]:
    """Write `report.json` and `report.png` into `out` (created if needed); returns both paths."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RefusalEditError(f"cannot create {out}: {exc.strerror}") from exc
    json_path = out / REPORT_JSON
    _atomic_write(json_path, report_json(report))
    png_path = plot_report(report, out / REPORT_PNG)
    return json_path, png_path


def record_evaluation(checkpoint: Path, report: EvalReport) -> Path:
    """Store `report.summary()` in an edited checkpoint's `refusal_edit.json` and re-render its README.md.

    Each file is replaced atomically, so an interrupted run leaves the old record, never half a file.
    """
    path = Path(checkpoint) / RECORD
    record = read_record(checkpoint, required=True)
    assert record is not None
    record["evaluation"] = _finite(report.summary())
    _atomic_write(path, json.dumps(record, indent=2) + "\n")
    _atomic_write(Path(checkpoint) / "README.md", render_card(record))
    return path
