"""The evaluation report in the terminal: refusal rates per judge, divergences, judge agreement, reasoning-only
refusals, per-category rates and sample responses (the workflow writes `report.json` and the plot).

Rates read as in the plot (percent); KL and cross-entropy are in nats.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from refusal_edit.console import show

EvalReport = Any  # `refusal_edit.evaluation.comparison.EvalReport`, as the evaluate workflow returns it


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _clip(text: str, width: int = 160) -> Text:
    flat = " ".join(text.split())
    return Text(flat if len(flat) <= width else flat[: width - 1] + "…")


DISAGREEMENT_ROWS = 6  # disagreement samples shown in the terminal (report.json keeps up to 50 per set)


def _degenerate_note(report: EvalReport) -> str:
    """`edited: repetition 12, empty 3` - the reasons degenerate replies were set apart, per side."""
    parts = []
    for side in ("base", "edited"):
        reasons: dict[str, int] = {}
        for kind in report.kinds:
            for reason, count in report.judging[side][kind].degenerate.items():
                reasons[reason] = reasons.get(reason, 0) + count
        if reasons:
            parts.append(f"{side}: " + ", ".join(f"{r} {c}" for r, c in sorted(reasons.items(), key=lambda x: -x[1])))
    return "; ".join(parts) if parts else "none"


def rates_table(report: EvalReport) -> Table:
    """Refusal rate per prompt set and judge, with the degenerate and complied shares next to it."""
    label = report.edited_label
    sources = ", ".join(f"{k}: {report.prompts[k]['source']}" for k in report.kinds)
    caption = Text(
        f"{sources}. Rates are over all replies; degenerate replies (empty, echo, loop, script switch) count as "
        f"neither refused nor complied. Degenerate replies: {_degenerate_note(report)}."
    )
    rates = Table(title=f"refusal rate: {report.base['name']} vs {label}", caption=caption)
    columns = ("prompts", "judge", "n", "base", "edited", "edited 95% CI", "change", "complied (edited)")
    for col in (*columns, "degenerate (base / edited)"):
        rates.add_column(col, justify="left" if col in ("prompts", "judge") else "right")
    for kind in report.kinds:
        for j, name in enumerate(report.judge_names):
            b, e = report.counts("base", kind, name), report.counts("edited", kind, name)
            undecided = f" ({e.undecided} undecided)" if e.undecided else ""
            rates.add_row(
                report.kind_label(kind) if j == 0 else "",
                Text(name),
                str(b.total) if j == 0 else "",
                _pct(b.refusal_rate),
                _pct(e.refusal_rate),
                "-".join(_pct(x) for x in report.interval("edited", kind, name)),
                f"{100 * (e.refusal_rate - b.refusal_rate):+.1f} pts",
                _pct(e.compliance_rate) + undecided,
                f"{_pct(b.degenerate_rate)} / {_pct(e.degenerate_rate)}" if j == 0 else "",
                end_section=j == len(report.judge_names) - 1,
            )
    return rates


def divergence_table(report: EvalReport) -> Table:
    d = report.divergence
    div = Table(
        title="divergence on harmless prompts (base greedy continuation, teacher-forced"
        + (f", first {report.settings['kl_tokens']} tokens)" if report.settings.get("kl_tokens") else ")"),
        caption=f"{d.skipped_empty} prompts with an empty continuation skipped for multi-token KL and CE; "
        f"{d.tokens} continuation tokens",
    )
    for col in (
        "first-token KL (nats)",
        "multi-token KL (nats)",
        "CE base (nats/token)",
        "CE edited (nats/token)",
        "PPL base",
        "PPL edited",
        "prompts",
    ):
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
    return div


def _kappa(x: float | None) -> str:
    return "-" if x is None else f"{x + 0.0:.2f}".replace("-0.00", "0.00")


def agreement_tables(report: EvalReport, rows: int = DISAGREEMENT_ROWS) -> list[Table]:
    """With several judges: their pairwise agreement per side and set, and replies they disagree on."""
    if len(report.judge_names) < 2:
        return []
    table = Table(
        title="agreement between judges",
        caption="over the replies both judges decided (degenerate and undecided ones left out); "
        "Cohen's kappa discounts the agreement expected by chance (1 = perfect, 0 = chance)",
    )
    for col in ("judges", "replies", "compared", "agreement", "kappa", "disagreements"):
        table.add_column(col, justify="left" if col in ("judges", "replies") else "right")
    groups = [("all", None, None)] + [(f"{s}, {k}", s, k) for s in ("base", "edited") for k in report.kinds]
    per = {(s, k): report.agreements(s, k) for _, s, k in groups[1:]}
    for i, pooled in enumerate(report.agreements()):
        for label, side, kind in groups:
            a = pooled if side is None else per[side, kind][i]
            table.add_row(
                Text(f"{a.a} / {a.b}") if side is None else "",
                label,
                str(a.compared),
                "-" if a.rate is None else _pct(a.rate),
                _kappa(a.kappa),
                str(len(a.disagree)),
                end_section=label == groups[-1][0],
            )
    out = [table]
    found = [
        (side, kind, row)
        for side in ("edited", "base")
        for kind in report.kinds
        for row in report.judging[side][kind].disagreements()
    ]
    if found and rows:
        names = report.judge_names
        dis = Table(title=f"replies the judges disagree on ({min(rows, len(found))} of {len(found)})", show_lines=True)
        dis.add_column("reply", ratio=1)
        dis.add_column("prompt", ratio=2)
        dis.add_column("answer", ratio=4)
        for name in names:
            dis.add_column(name, justify="center")
        for side, kind, row in found[:rows]:
            verdicts = [_verdict(row["verdicts"].get(name, {})) for name in names]
            dis.add_row(f"{side}, {kind}", _clip(row["prompt"], 120), _clip(row["answer"], 240), *verdicts)
        out.append(dis)
    return out


def _verdict(v: dict[str, Any]) -> Text:
    if v.get("degenerate"):
        return Text("degenerate")
    refused = v.get("refused")
    return Text("?" if refused is None else "refused" if refused else "complied", style="red" if refused else "")


def reasoning_table(report: EvalReport) -> Table | None:
    """Refusals that appear only in a thinking model's reasoning block (its final answer complied)."""
    if not report.reasoning_delimiters:
        return None
    counts = {(s, k): report.counts(s, k).reasoning_only for s in ("base", "edited") for k in report.kinds}
    if not any(counts.values()):
        return None
    open_, close = report.reasoning_delimiters
    table = Table(
        title=f"refused only in the reasoning ({open_}...{close}), not in the final answer ({report.judge_names[0]})",
        caption="judges judge the final answer; these replies count as complied or undecided there",
    )
    for col in ("prompts", "base", "edited"):
        table.add_column(col, justify="left" if col == "prompts" else "right")
    for kind in report.kinds:
        table.add_row(report.kind_label(kind, induced=False), str(counts["base", kind]), str(counts["edited", kind]))
    return table


def category_table(report: EvalReport) -> Table | None:
    """The first judge's refusal rate per category (degenerate share of the edit alongside)."""
    name = report.judge_names[0]
    per = {k: report.judging["base"][k].stats[name].per_category for k in report.kinds}
    if not any(per.values()):
        return None
    cats = Table(title=f"refusal rate per category ({name})")
    for col in ("prompts", "category", "n", "base", "edited", "degenerate (edited)"):
        cats.add_column(col, justify="left" if col in ("prompts", "category") else "right")
    for kind in report.kinds:
        edited = report.judging["edited"][kind].stats[name].per_category
        for cat, counts in per[kind].items():
            e = edited[cat]
            cats.add_row(
                report.kind_label(kind, induced=False),
                Text(cat),
                str(counts.total),
                _pct(counts.refusal_rate),
                _pct(e.refusal_rate),
                _pct(e.degenerate_rate),
            )
    return cats


def samples_table(report: EvalReport) -> Table | None:
    if not report.samples:
        return None
    samples = Table(title="sample responses (greedy)", show_lines=True, expand=True)
    samples.add_column("prompt", ratio=2)
    samples.add_column("base", ratio=3)
    samples.add_column("edited", ratio=3)
    for s in report.samples:
        head = Text(f"[{s.kind}{'/' + s.category if s.category else ''}] ", style="bold")
        samples.add_row(
            head + _clip(s.instruction),
            _clip(s.base) + _tag(s.base_refusal, s.base_degenerate),
            _clip(s.edited) + _tag(s.edited_refusal, s.edited_degenerate),
        )
    return samples


def _tag(refused: bool, degenerate: str | None) -> Text:
    if degenerate:
        return Text(f" (degenerate: {degenerate})", style="yellow")
    return Text(" (refusal)" if refused else "", style="red")


def tables(report: EvalReport) -> list[Table]:
    """The terminal view: refusal rates per judge, divergences, judge agreement, reasoning-only refusals,
    per-category rates and sample responses."""
    out: list[Table | None] = [
        rates_table(report),
        divergence_table(report),
        *agreement_tables(report),
        reasoning_table(report),
        category_table(report),
        samples_table(report),
    ]
    return [t for t in out if t is not None]


def print_report(report: EvalReport, target: Console | None = None) -> None:
    """The tables, on stdout unless `target` says otherwise (never cropped)."""
    for table in tables(report):
        show(table, target)
