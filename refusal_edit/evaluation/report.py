"""Writing an `EvalReport`: `report.json` and a PNG plot (the terminal's tables are the command line's:
`refusal_edit.cli.report`).

Rates read the same everywhere (percent, in tables and plot); KL and cross-entropy are in nats.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import suppress
from pathlib import Path

from refusal_edit.checkpoint.atomic import TMP_MARK, make_parents, write_failure
from refusal_edit.checkpoint.record import finite
from refusal_edit.evaluation.comparison import KIND_LABEL, EvalReport
from refusal_edit.interrupt import output_complete

REPORT_JSON = "report.json"
REPORT_PNG = "report.png"


def report_json(report: EvalReport) -> str:
    return json.dumps(finite(report.to_dict()), indent=2, ensure_ascii=False) + "\n"


def _category_rates(report: EvalReport, side: str, kind: str) -> dict[str, float]:
    counts = report.counts(side, kind)
    per = report.judging[side][kind].stats[report.judge_names[0]].per_category
    return {c: n.refusal_rate for c, n in per.items()} or {"all": counts.refusal_rate}


COLOURS = {"harmful": "tab:red", "harmless": "tab:blue", "borderline": "tab:orange"}


def plot_report(report: EvalReport, path: Path) -> Path:
    """Refusal rate against KL (base at 0, edited at its KL) and per-category refusal bars per prompt set
    (the first judge's rates)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    kinds = report.kinds
    fig = Figure(figsize=(5.5 * (1 + len(kinds)), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax0, *bars = fig.subplots(1, 1 + len(kinds), width_ratios=[1] + [1.4] * len(kinds))
    d = report.divergence
    for kind in kinds:
        b, e = report.rate("base", kind), report.rate("edited", kind)
        c = COLOURS[kind]
        ax0.scatter([0.0], [b], color=c, marker="s", label=f"{kind}, base")
        ax0.scatter([d.first_token_kl], [e], color=c, marker="^", facecolors="none", label=f"{kind}, first-token KL")
        if d.multi_token_kl is not None:
            ax0.scatter([d.multi_token_kl], [e], color=c, marker="o", label=f"{kind}, multi-token KL")
            ax0.annotate("", (d.multi_token_kl, e), (0.0, b), arrowprops={"arrowstyle": "->", "color": c})
    ax0.set_xlabel("KL(base || edited), harmless prompts (nats)")
    ax0.set_ylabel(f"refusal rate ({report.judge_names[0]})")
    ax0.set_ylim(-0.05, 1.05)
    ax0.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax0.set_title("refusal vs KL")
    ax0.legend(fontsize=7)
    for ax, kind in zip(bars, kinds, strict=True):
        base = _category_rates(report, "base", kind)
        edited = _category_rates(report, "edited", kind)
        names = list(base)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [base[n] for n in names], width=0.4, label="base", color="tab:gray")
        ax.bar(
            [x + 0.2 for x in xs], [edited.get(n, 0.0) for n in names], width=0.4, label="edited", color=COLOURS[kind]
        )
        ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("refusal rate")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_title(f"{KIND_LABEL[kind]} prompts per category (n={report.prompts[kind]['count']})")
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.base['name']} vs {report.edited_label}")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def write_report(report: EvalReport, out: Path) -> tuple[Path, Path]:
    """Write `report.json` and `report.png` into `out` (created if needed); returns both paths.

    Both are written under temporary names and renamed at the end, so a failure (a full disk) or an
    interrupt leaves neither a half report nor a folder this call created."""
    out = Path(out)
    created = make_parents(out)
    mark = f"{TMP_MARK}{uuid.uuid4().hex[:8]}"
    json_tmp, png_tmp = out / f".{REPORT_JSON}{mark}", out / f".{REPORT_PNG}{mark}.png"
    json_path, png_path = out / REPORT_JSON, out / REPORT_PNG
    try:
        json_tmp.write_text(report_json(report), encoding="utf-8")
        plot_report(report, png_tmp)
        os.replace(json_tmp, json_path)
        os.replace(png_tmp, png_path)
    except BaseException as exc:
        for tmp in (json_tmp, png_tmp):
            tmp.unlink(missing_ok=True)
        for folder in created:  # deepest first; only folders that are still empty
            with suppress(OSError):
                folder.rmdir()
        if isinstance(exc, OSError):
            raise write_failure(exc, out) from None
        raise
    output_complete(out)
    return json_path, png_path
