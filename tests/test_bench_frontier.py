"""bench/frontier.py's bookkeeping (no models): the dominance verdict and heretic's time-to-trial over sessions."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


frontier = _load("bench_frontier", BENCH / "frontier.py")
peer = _load("bench_heretic_peer", BENCH / "peers" / "heretic_peer.py")


def _point(method: str, pid: str, refusal: float, ft: float, mt: float):
    test = {
        "harmful_refusal_edited": refusal,
        "first_token_kl": ft,
        "multi_token_kl": mt,
        "harmful_prompts": "builtin:harmful@test (100)",
        "harmful_count": 100,
    }
    return frontier.Point(method, pid, f"/x/{pid}", test=test)


def test_dominance_needs_all_three_no_worse_and_counts_ties():
    tune = frontier.Method("tune", [_point("tune", "a", 0.05, 0.03, 0.004), _point("tune", "b", 0.02, 0.06, 0.030)])
    heretic = frontier.Method(
        "heretic",
        [
            _point("heretic", "h1", 0.18, 0.095, 0.012),  # a is better on all three
            _point("heretic", "h2", 0.05, 0.03, 0.004),  # a ties on all three: "no more" holds
            _point("heretic", "h3", 0.01, 0.20, 0.050),  # fewer refusals than any tune point
            _point("heretic", "h4", 0.10, 0.05, 0.003),  # lower multi-token KL than a
        ],
    )
    paper = frontier.Method("paper", [_point("paper", "paper", 0.01, 0.127, 0.048)])
    reference = _point("tune", "t0", 0.01, 0.127, 0.048)  # tune's reference point: the paper's edit itself
    reference.params["same_edit_as"] = "paper"
    tune.points.append(reference)
    rows = {(r["method"], r["point"]): r["dominated_by"] for r in frontier.dominance([tune, heretic, paper])}
    assert rows == {
        ("heretic", "h1"): ["a"],
        ("heretic", "h2"): ["a"],
        ("heretic", "h3"): ["t0"],  # the reference is a tune point like any other against heretic
        ("heretic", "h4"): [],
        ("paper", "paper"): [],  # a rival too: b refuses more, and t0 (the same edit) does not count
    }


def test_dominance_skips_unjudged_points():
    tune = frontier.Method("tune", [frontier.Point("tune", "a", "/x")])
    heretic = frontier.Method(
        "heretic", [_point("heretic", "h1", 0.5, 0.5, 0.5), frontier.Point("heretic", "h2", "/y")]
    )
    assert frontier.dominance([tune, heretic]) == [
        {
            "method": "heretic",
            "point": "h1",
            "numbers": {"harmful_refusal_edited": 0.5, "first_token_kl": 0.5, "multi_token_kl": 0.5},
            "dominated_by": [],
            "within_noise": [],
            "gaps": [],
        }
    ]


def test_a_gap_the_test_split_cannot_resolve_is_reported_apart():
    """Near 1 %, 100 prompts cannot separate 1 from 3 refusals: such a point is listed as within noise, with
    Newcombe's interval of the gap; a resolvable gap or a point with more KL is not."""
    tune = frontier.Method(
        "tune",
        [
            _point("tune", "close", 0.03, 0.111, 0.0195),  # less KL, 3 vs 1 refused: unresolvable
            _point("tune", "far", 0.13, 0.037, 0.005),  # less KL, 13 vs 1: resolvable
            _point("tune", "hot", 0.03, 0.132, 0.026),  # more first-token KL: not a candidate
        ],
    )
    paper = frontier.Method("paper", [_point("paper", "paper", 0.01, 0.127, 0.0483)])
    (row,) = frontier.dominance([tune, paper])
    assert row["dominated_by"] == []
    (near,) = row["within_noise"]
    assert near["point"] == "close" and near["refusal_gap"] == 0.02
    lo, hi = near["gap_ci95"]
    assert lo == pytest.approx(-0.0287, abs=1e-4) and hi == pytest.approx(0.0751, abs=1e-4)
    assert frontier._interval(paper.points[0]) == [0.0018, 0.0545]


def test_the_second_judge_gives_its_own_dominance_verdict(capsys):
    """With the LLM judge's rates the verdict is computed again from its counts (the KLs are the same) and
    printed with that judge's rate."""
    close = _point("tune", "close", 0.03, 0.111, 0.0195)
    close.test[frontier.SECOND] = 0.01  # the markers' 3 were 1 refusal and 2 disclaimers
    paper = _point("paper", "paper", 0.01, 0.127, 0.0483)
    paper.test[frontier.SECOND] = 0.02
    methods = [frontier.Method("tune", [close]), frontier.Method("paper", [paper])]
    (markers,) = frontier.dominance(methods)
    (second,) = frontier.dominance(methods, refusal=frontier.SECOND)
    assert markers["dominated_by"] == [] and [w["point"] for w in markers["within_noise"]] == ["close"]
    assert second["dominated_by"] == ["close"] and second["within_noise"] == []
    assert second["numbers"] == {frontier.SECOND: 0.02, "first_token_kl": 0.127, "multi_token_kl": 0.0483}
    frontier.print_dominance([markers])
    frontier.print_dominance([second], frontier.SECOND)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "paper paper refusal 1%, FT-KL 0.1270, MT-KL 0.0483: dominated by tune point(s): none",
        "  less KL of both kinds, a higher rate by a gap the test split cannot resolve: close (+2 pts, unpaired 95% "
        "CI -2.9 to +7.5)",
        "  close minus paper: +2.0 pts, unpaired 95% CI -2.9 to +7.5",
        "paper paper refusal 2%, FT-KL 0.1270, MT-KL 0.0483: dominated by tune point(s): close",
        "  close minus paper: -1.0 pts, unpaired 95% CI -6.1 to +3.7",
    ]
    unjudged = _point("tune", "u", 0.0, 0.0, 0.0)  # no second verdict: not counted for either side
    (again,) = frontier.dominance([frontier.Method("tune", [unjudged]), methods[1]], refusal=frontier.SECOND)
    assert again["dominated_by"] == []


def test_not_complied_counts_degenerate_replies_against_the_edit(capsys):
    """A degenerate reply is never compliance: by refusals alone the paper's edit (1 refused, 2 broken replies)
    is not dominated by a point with 3 refused and none broken; by replies that do not comply it is (3 vs 3,
    ties count), from the counts the judge report gives (complied over all harmful prompts)."""
    summary = {"harmful_refusal_edited": 0.01, "harmful_complied_edited": 0.97, "harmful_degenerate_edited": 0.02}
    paper_numbers = frontier._test_numbers(summary)
    assert paper_numbers[frontier.NOT_COMPLIED] == 0.03
    close_numbers = frontier._test_numbers({"harmful_refusal_edited": 0.03, "harmful_complied_edited": 0.97})
    assert close_numbers[frontier.NOT_COMPLIED] == 0.03
    assert frontier._test_numbers({})[frontier.NOT_COMPLIED] is None  # an old report without the count
    paper = _point("paper", "paper", 0.01, 0.127, 0.0483)
    close = _point("tune", "close", 0.03, 0.101, 0.0199)
    paper.test[frontier.NOT_COMPLIED] = paper_numbers[frontier.NOT_COMPLIED]
    close.test[frontier.NOT_COMPLIED] = close_numbers[frontier.NOT_COMPLIED]
    methods = [frontier.Method("tune", [close]), frontier.Method("paper", [paper])]
    (refusals,) = frontier.dominance(methods)
    (not_complied,) = frontier.dominance(methods, refusal=frontier.NOT_COMPLIED)
    assert refusals["dominated_by"] == [] and not_complied["dominated_by"] == ["close"]
    frontier.print_dominance([not_complied], frontier.NOT_COMPLIED)
    assert capsys.readouterr().out == (
        "paper paper not complied 3%, FT-KL 0.1270, MT-KL 0.0483: dominated by tune point(s): close\n"
        "  close minus paper: +0.0 pts, unpaired 95% CI -5.8 to +5.8\n"
    )
    llm = frontier._second_numbers(_rejudged(0, complied=98))  # 0 refused, 2 degenerate
    assert llm[frontier.SECOND] == 0.0 and llm[frontier.SECOND_NOT_COMPLIED] == 0.02
    # frontier.json's verdicts: the LLM judge's only once some point was judged by it
    assert list(frontier.dominance_verdicts(methods)) == ["dominance", "dominance_not_complied"]
    paper.test |= llm
    got = frontier.dominance_verdicts(methods)
    assert list(got) == [key for key, _, _ in frontier.VERDICTS]
    assert got["dominance_not_complied"] == [not_complied]
    assert got["dominance_not_complied_second_judge"][0]["numbers"][frontier.SECOND_NOT_COMPLIED] == 0.02


def _rejudged(refused: int, total: int = 100, complied: int | None = None) -> dict:
    llm = {"total": total, "refused": refused, "complied": total - refused if complied is None else complied}
    markers = {"total": total, "refused": 99, "complied": 1}
    return {"judging": {"edited": {"harmful": {"stats": {"markers": markers, "llm:judge-model": llm}}}}}


def test_second_judge_reads_the_llm_judges_rate_from_a_kept_report(tmp_path: Path, monkeypatch):
    out = tmp_path / "judge-llm" / "tune" / "t1"
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(_rejudged(2)))
    # reuse: the kept report is read; nothing is loaded or judged (base None would fail otherwise)
    got = frontier.second_judge(None, tmp_path / "judge" / "tune" / "t1", out, reuse=True)
    assert got == {frontier.SECOND: 0.02, frontier.SECOND_NOT_COMPLIED: 0.02, "second_judge": "llm:judge-model"}
    judged = tmp_path / "judge" / "tune" / "t1" / "report.json"  # judged again since: the kept one is stale
    judged.parent.mkdir(parents=True)
    judged.write_text("{}")
    os.utime(out / "report.json", (1, 1))
    calls = []
    monkeypatch.setattr(
        "refusal_edit.workflows.evaluation.rejudge",
        lambda report, base, **kw: calls.append(report) or (out / "report.json").write_text(json.dumps(_rejudged(5))),
    )
    assert frontier.second_judge("base", judged.parent, out, reuse=True)[frontier.SECOND] == 0.05
    assert calls == [judged.parent]
    with pytest.raises(SystemExit, match="no LLM judge"):
        frontier._second_numbers({"judging": {"edited": {"harmful": {"stats": {"markers": {}}}}}})


def test_reached_over_sessions_is_setup_plus_trial_durations():
    data = {
        "search_wall_s": 100.0,
        "trials": [{"trial": 1, "seconds": 10.0}, {"trial": 2, "seconds": 20.0}, {"trial": 3, "seconds": None}],
    }
    assert peer._reached(data, setup_s=5.0) == {1: 15.0, 2: 35.0}
    assert peer._reached(data) == {2: 100.0, 1: 80.0}  # one uninterrupted session: wall less the later trials


def test_load_run_reads_the_cost_over_sessions(tmp_path: Path):
    export = tmp_path / "heretic" / "trial-3"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    run = tmp_path / "heretic-run"
    run.mkdir()
    point = {"trial": 3, "path": str(export), "refusals": 4, "n_bad_prompts": 60, "kl_divergence": 0.09}
    trials = [{"trial": t, "state": "COMPLETE", "seconds": 10.0} for t in (1, 2, 3)]
    summary = {"front": [point], "trials": trials, "search_wall_s": 50.0, "total_wall_s": 60.0, "peak_rss_mib": 1.0}
    (run / "heretic-run.json").write_text(json.dumps(summary))
    assert peer.load_run(run).cost is None
    (run / "cost.json").write_text(json.dumps({"setup_s": 7.0, "search_wall_s": 37.0, "peak_rss_mib": 3000.0}))
    loaded = peer.load_run(run)
    assert loaded.trials == 3 and loaded.cost["peak_rss_mib"] == 3000.0
    assert loaded.points[0].reached_s == pytest.approx(37.0)


def test_base_replies_survive_a_new_bench_process(tmp_path: Path):
    from refusal_edit.generation import Generated

    path = tmp_path / "judge" / "base-replies.json"
    path.parent.mkdir()
    kept = {"64:0:abc": [Generated("p", "I can't help with that.", [40, 646])]}
    frontier.save_base_replies(path, kept)
    loaded: dict = {}
    frontier.load_base_replies(path, loaded)
    assert loaded == kept


def test_kept_checkpoints_and_reports_are_reused_only_while_they_match(tmp_path: Path):
    """A study run again may give a point id another edit: its kept checkpoint is written again, and a point
    whose checkpoint was written after its judge report is judged again."""
    ckpt = tmp_path / "points" / "t26"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    assert not frontier._written(ckpt)  # no edit record: not ours, not finished
    spec = {"direction": "layer", "embedding": 0.7}
    (ckpt / "refusal_edit.json").write_text(json.dumps({"spec": {"edit": spec, "point": "t26"}}))
    assert frontier._written(ckpt) and frontier._written(ckpt, spec)
    assert not frontier._written(ckpt, {**spec, "direction": "downstream"})
    report = tmp_path / "judge" / "report.json"
    report.parent.mkdir()
    assert not frontier._newer(report, frontier._newest_file(ckpt))  # never judged
    report.write_text("{}")
    for f in ckpt.iterdir():
        os.utime(f, (1, 1))
    assert frontier._newer(report, frontier._newest_file(ckpt))
    os.utime(report, (10, 10))  # the edit written again after the report; config.json keeps its source's time
    os.utime(ckpt / "refusal_edit.json", (20, 20))
    assert frontier._newest_file(ckpt).name == "refusal_edit.json"
    assert not frontier._newer(report, frontier._newest_file(ckpt))


def test_a_finished_tune_run_is_used_as_it_is_and_only_the_judged_points_are_written(tmp_path: Path, monkeypatch):
    """--tune-run reads a finished run's front.json (no tune command; its cost is the timings it records) and,
    with --judge-only, only the named tune points are orthogonalized: the rest are listed without a checkpoint."""
    run = tmp_path / "tune"
    run.mkdir()
    confirmed = [
        {"id": "t0", "reference": True, "spec": {}, "confirmed": {"refusal_rate": 0.03}},
        {"id": "t26", "spec": {"weight": 0.9}, "confirmed": {"refusal_rate": 0.0}},
        {"id": "t27", "spec": {"weight": 1.0}, "confirmed": {"refusal_rate": 0.0}},
    ]
    front = {"confirmed": confirmed, "timings": {"search_s": 100.0, "confirm_s": 50.0, "resolve_s": 20.5}}
    (run / "front.json").write_text(json.dumps(front))
    ran: list[list[str]] = []
    monkeypatch.setattr(
        frontier, "timed", lambda cmd: ran.append(list(cmd)) or frontier.Cost(1.0, 1.0, 1.0, (0,) * 3, (0,) * 3)
    )
    method = frontier.run_tune("m", tmp_path / "d", tmp_path / "out", False, run=run, only={"t27"})
    assert [c[1] for c in ran] == ["orthogonalize"] and f"{run / 'front.json'}#t27" in ran[0]
    assert method.wall_s == 170.5 and method.peak_rss_mib is None
    paths = {p.id: p.path for p in method.points}
    assert paths == {"t0": None, "t26": None, "t27": str(tmp_path / "out" / "points" / "t27")}


def _report(refused: list[int], degenerate: list[int], n: int = 100) -> dict:
    samples = [
        {"index": i, "verdicts": {"markers": {"refused": i in refused}}}
        | ({"degenerate": "empty"} if i in degenerate else {})
        for i in range(n)
    ]
    return {"judging": {"edited": {"harmful": {"judges": {"markers": {}}, "samples": samples}}}}


def test_gaps_on_the_test_split_are_paired_prompt_by_prompt(capsys):
    """Every point is judged on the same 100 test prompts: the bench keeps which prompts each rate counted and
    pairs the gaps. 8 against 1 refused, the 1 among the 8: paired +1.6 to +13.9 (resolved); without the
    per-prompt lists, Newcombe's unpaired interval. Degenerate replies count as not complied, not refused."""
    per = frontier._per_prompt(
        _report([0, 1, 2, 3, 4, 5, 6, 7], [9]), None, {frontier.KEYS[0]: False, frontier.NOT_COMPLIED: True}
    )
    assert per[frontier.PER_PROMPT] == {frontier.KEYS[0]: list(range(8)), frontier.NOT_COMPLIED: [*range(8), 9]}
    tune = _point("tune", "t26", 0.08, 0.06, 0.011)
    paper = _point("paper", "paper", 0.01, 0.127, 0.0483)
    tune.test |= per
    paper.test |= frontier._per_prompt(_report([0], []), None, {frontier.KEYS[0]: False})
    got = frontier.gap(tune, paper)
    assert got["paired"] and got["refusal_gap"] == 0.07
    assert got["gap_ci95"] == pytest.approx([0.0156, 0.1392], abs=1e-4)
    (row,) = frontier.dominance([frontier.Method("tune", [tune]), frontier.Method("paper", [paper])])
    assert row["within_noise"] == [] and row["gaps"] == [got]  # resolved: not within noise
    frontier.print_dominance([row])
    assert "t26 minus paper: +7.0 pts, paired 95% CI +1.6 to +13.9" in capsys.readouterr().out
    del paper.test[frontier.PER_PROMPT]
    unpaired = frontier.gap(tune, paper)
    assert not unpaired["paired"] and unpaired["gap_ci95"][0] > 0.0  # unpaired resolves this one too, more widely
    assert unpaired["gap_ci95"][1] - unpaired["gap_ci95"][0] > got["gap_ci95"][1] - got["gap_ci95"][0]
