"""tune's pick rule on stand-in numbers (no model): least damage among the points whose refused-or-degenerate
rate cannot be told from the lowest, judged on held-out prompts where the val prompts cannot tell; the
alternatives; which points are judged again; and the whole of `tune` on stand-in scorers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from refusal_edit.errors import RefusalEditError
from refusal_edit.evaluation.stats import difference, resolvable, wilson
from refusal_edit.tuning.pick import PickRule, pick, to_resolve


def point(name, failures, first, multi, prompts=32, held=None):
    """A confirmed point: `failures` refused replies of `prompts`, and maybe held-out (refused, prompts)."""
    return {
        "id": name,
        "confirmed": {
            "refusal_rate": failures / prompts,
            "degenerate_rate": 0.0,
            "first_token_kl": first,
            "multi_token_kl": multi,
            "prompts": prompts,
        },
        "resolved": None if held is None else {"refused": held[0], "degenerate": 0, "prompts": held[1]},
    }


def issue_points(held: bool):
    """Issue #33's run: t26 0 % at 0.1002 / 0.0141, t27 0 % at 0.168 / 0.026, t29 2 of 32 at 0.0935 / 0.0109
    (the paper's edit 1 of 32 at 0.19 / 0.05, t24 6 of 32). Held out: t29 refuses 6 %, as it did on the
    issue's own held-out prompts; t26 and t27 about 1 %."""
    numbers = {"t0": (3, 240), "t26": (3, 240), "t27": (2, 240), "t29": (14, 240)} if held else {}
    return [
        point("t0", 1, 0.190, 0.050, held=numbers.get("t0")),
        point("t26", 0, 0.1002, 0.0141, held=numbers.get("t26")),
        point("t27", 0, 0.168, 0.026, held=numbers.get("t27")),
        point("t29", 2, 0.0935, 0.0109, held=numbers.get("t29")),
        point("t24", 6, 0.067, 0.0076),
    ]


def test_a_point_just_over_an_old_kl_cap_does_not_lose_to_one_that_refuses_more():
    """The t26/t27/t29 case: the old rule (fewest refusals with first-token KL <= 0.1) picked t29, which refuses
    more, because t26 was 0.0002 over the cap. The default has no cap: the held-out prompts tell t29's 6 %
    from the lowest rate, t26's cannot be told from it, and t26 damages least of the rest."""
    points = issue_points(held=True)
    got = pick(points)
    assert points[got.index]["id"] == "t26" and got.within_max_kl
    assert got.verdicts["t29"].startswith("refused or degenerate 5.8% (14/240; 95% CI 3.5-9.6%) on held-out prompts")
    assert "not shown within 8 points of t27's 0.8% (2/240" in got.verdicts["t29"]
    assert got.verdicts["t24"].startswith("refused or degenerate 18.8% (6/32;")  # lost on val already
    assert "more damage than t26" in got.verdicts["t27"] and "more damage than t26" in got.verdicts["t0"]
    assert got.verdicts["t26"].startswith("picked: least damage")
    # the old rule's cliff, now only when asked for: the cap rules t26 out and t29 is the fewest under it
    capped = pick(points, PickRule.parse("fewest-refusals", 0.1))
    assert points[capped.index]["id"] == "t29"
    assert capped.verdicts["t26"] == "first-token KL 0.1002 over the cap 0.1"
    # the default rule under that cap: t24 (6 of 32 on val) cannot be told from t29 yet, so it is judged next
    under = PickRule.parse("least-damage-under:0.1")
    assert [points[i]["id"] for i in to_resolve(points, under, 3)] == ["t24"]


def test_on_val_alone_the_rates_cannot_be_told_apart_so_the_contenders_are_judged_again():
    """32 val prompts cannot tell t29's 2 refusals from t26's none (that is why they are judged again): on val
    alone the least damaging contender wins, and `to_resolve` asks for held-out numbers of the point at the
    lowest val rate that damages most (t27: the likeliest to refuse least), then of the least damaging ones."""
    assert not resolvable(difference(2, 32, 0, 32)) and resolvable(difference(6, 32, 0, 32))
    points = issue_points(held=False)
    assert points[pick(points).index]["id"] == "t29"
    assert [points[i]["id"] for i in to_resolve(points, PickRule(), 3)] == ["t27", "t29", "t26"]
    assert [points[i]["id"] for i in to_resolve(points, PickRule(), 2)] == ["t27", "t29"]
    assert to_resolve(points, PickRule(), 0) == [] and to_resolve(points, PickRule("point", point="t27"), 3) == []
    # held-out numbers for those three: t29 drops out, and no unjudged point would beat t26 - nothing more to judge
    held = {"t26": (3, 240), "t29": (14, 240), "t27": (2, 240)}
    for p in points:
        if p["id"] in held:
            p["resolved"] = {"refused": held[p["id"]][0], "degenerate": 0, "prompts": 240}
    assert points[pick(points).index]["id"] == "t26" and to_resolve(points, PickRule(), 3) == []


def test_an_unjudged_point_that_would_beat_the_pick_is_judged_in_a_later_round():
    """After a round, a contender still without held-out numbers and with less damage than the pick is judged
    next: the pick rests on held-out numbers whenever they could change it."""
    points = [
        point("t1", 0, 0.20, 0.05, held=(2, 240)),
        point("t2", 1, 0.05, 0.01, held=(30, 240)),  # resolvably worse held out
        point("t3", 1, 0.08, 0.02),  # not judged yet, and it would beat t1
        point("t4", 1, 0.30, 0.09),  # not judged either, but more damage than t1
    ]
    assert points[pick(points).index]["id"] == "t3"  # on its val numbers, for now
    assert [points[i]["id"] for i in to_resolve(points, PickRule(), 3)] == ["t3"]


def test_fewest_refusals_a_named_point_and_a_cap_nothing_is_under():
    points = issue_points(held=True)
    fewest = pick(points, PickRule.parse("fewest-refusals"))
    assert points[fewest.index]["id"] == "t27"  # 2 of 240 held out: the fewest, whatever the KL
    assert (
        fewest.verdicts["t26"].startswith("refused or degenerate 1.2% (3/240")
        and "more than t27" in fewest.verdicts["t26"]
    )
    named = pick(points, PickRule.parse("t0"))
    assert points[named.index]["id"] == "t0" and named.verdicts["t0"] == "picked: named"
    with pytest.raises(RefusalEditError, match="no confirmed point 't5'"):
        pick(points, PickRule.parse("t5"))
    nothing = pick(points, PickRule(max_kl=0.01))
    assert points[nothing.index]["id"] == "t24" and not nothing.within_max_kl  # the least first-token KL
    assert "no point has first-token KL <= 0.01" in nothing.rule


@pytest.mark.parametrize(
    ("text", "cap", "expected"),
    [
        ("least-damage", None, PickRule()),
        ("fewest-refusals", 0.2, PickRule("fewest-refusals", 0.2)),
        ("least-damage-under:0.1", None, PickRule("least-damage", 0.1)),
        ("least-damage-under:0.1", 0.1, PickRule("least-damage", 0.1)),
        ("t27", None, PickRule("point", None, "t27")),
    ],
)
def test_pick_rules_parse(text, cap, expected):
    assert PickRule.parse(text, cap) == expected


@pytest.mark.parametrize(
    ("text", "cap", "message"),
    [
        ("cheapest", None, "unknown pick 'cheapest'"),
        ("least-damage-under:x", None, "expected least-damage-under:KL"),
        ("least-damage-under:0.1", 0.2, "two KL caps given"),
        ("least-damage", -1.0, "the KL cap must be positive"),
        ("T27", None, "unknown pick"),
    ],
)
def test_bad_pick_rules_are_one_line_errors(text, cap, message):
    with pytest.raises(RefusalEditError, match=message):
        PickRule.parse(text, cap)


def test_the_margin_parses_in_points_or_off():
    assert PickRule.parse_margin(None) == PickRule().margin == 0.08
    assert PickRule.parse_margin("5") == 0.05 and PickRule.parse_margin(" OFF ") is None
    assert PickRule.parse("least-damage", None, None) == PickRule(margin=None)
    with pytest.raises(RefusalEditError, match="percentage points"):
        PickRule.parse_margin("5%")
    with pytest.raises(RefusalEditError, match="share of the prompts"):
        PickRule(margin=1.5)


def test_a_bad_pick_fails_before_any_work(tmp_path, capsys):
    """A pick the CLI cannot parse, or a point the study will never have: exit 1 with one line, nothing made."""
    import sys

    from refusal_edit.cli import main

    out = tmp_path / "tune"
    for args, message in (
        (["--pick", "cheapest"], "unknown pick 'cheapest'"),
        (["--pick", "t40", "--trials", "32"], "pick t40: the study has trials t0 to t31"),
    ):
        argv = sys.argv
        sys.argv = [
            "refusal-edit",
            "tune",
            "no-such-model",
            "--direction",
            str(tmp_path / "d"),
            "--out",
            str(out),
            *args,
        ]
        try:
            with pytest.raises(SystemExit) as exc:
                main()
        finally:
            sys.argv = argv
        assert exc.value.code == 1
        assert message in capsys.readouterr().err
        assert not out.exists()


class _Scorer:
    """Stand-in proxies (no model): refusal falls and KL rises with strength."""

    base = SimpleNamespace(refusal=0.5, refusal_logodds=0.0)

    def score(self, spec, bank):
        from refusal_edit.tuning.proxies import ProxyScores

        s = spec.to_json()
        strength = (s["attn"]["weight"] + s["mlp"]["weight"] + s["embedding"]) / 3
        refusal = math.exp(-3 * strength)
        return ProxyScores(refusal, 0.1 * strength**2, math.log(refusal))


def _strength(spec) -> float:
    s = spec.to_json()
    return (s["attn"]["weight"] + s["mlp"]["weight"] + s["embedding"]) / 3


class _Confirmer:
    """Stand-in confirmation on 32 val prompts: stronger points refuse less; none tells 0-3 refusals apart."""

    def measure(self, points, bank):
        from refusal_edit.tuning.confirm import Confirmed

        out = []
        for _, edit in points:
            s = 0.0 if edit is None else _strength(edit)
            refused = 16 if edit is None else round(3 * max(0.0, 0.9 - s) / 0.9)
            kl = 0.0 if edit is None else 0.1 * s**2
            out.append(Confirmed(refused / 32, 0.0, 1 - refused / 32, kl, kl / 4, 32, 16, 0.0, []))
        return out


class _CrossFit:
    """Stand-in held-out judge on 240 prompts: points weaker than 0.8 of the paper's strength refuse 5 %."""

    def __init__(self):
        self.rounds: list[list[str]] = []

    def measure(self, points):
        self.rounds.append([label for label, _ in points])
        return [
            {"refused": 12 if _strength(spec) < 0.8 else 1, "degenerate": 0, "prompts": 240, "failure_ci95": [0, 1]}
            for _, spec in points
        ]


def test_tune_judges_contenders_on_held_out_prompts_and_records_why_each_point_lost(tmp_path, monkeypatch):
    """The whole of `tune` on stand-ins: the contenders are judged on the cross-fit judge (made once, only when
    needed), the pick is the least damaging point not resolvably above the lowest held-out rate, and every
    confirmed point has a verdict."""
    from refusal_edit.tuning import run as tuning

    bank = SimpleNamespace(layer=3, mean_diff=None, harmless_mean=None)
    settings = tuning.TuneSettings(trials=16, refine=4, startup=4, confirm=4, preserve_norm=False)
    judge, made = _CrossFit(), []
    result = tuning.tune(
        _Scorer(), _Confirmer(), bank, 6, settings, tmp_path / "study.journal", crossfit=lambda: made.append(1) or judge
    )
    assert made == [1] and judge.rounds and len(judge.rounds[0]) <= 3
    judged = {p["id"] for p in result.confirmed if p["resolved"]}
    assert judged == {label for r in judge.rounds for label in r}
    chosen = result.point()
    assert chosen["resolved"] is not None and chosen["resolved"]["refused"] == 1  # not a 5 % point
    weaker = [p for p in result.confirmed if p["resolved"] and p["resolved"]["refused"] == 12]
    for p in weaker:  # judged and lost on held-out prompts
        assert "on held-out prompts, not shown within 8 points of" in result.pick["verdicts"][p["id"]]
    assert set(result.pick["verdicts"]) == {p["id"] for p in result.confirmed}
    assert result.pick["kind"] == "least-damage" and result.pick["max_kl"] is None
    assert result.timings["resolve_s"] >= 0
    # no cross-fit judge: the pick rests on val, nothing is judged again
    again = tuning.tune(_Scorer(), _Confirmer(), bank, 6, settings, tmp_path / "study.journal", resume=True)
    assert all(p["resolved"] is None for p in again.confirmed)


def test_a_named_point_is_confirmed_even_off_the_front(tmp_path, monkeypatch):
    from refusal_edit.tuning import run as tuning

    bank = SimpleNamespace(layer=3, mean_diff=None, harmless_mean=None)
    settings = tuning.TuneSettings(trials=12, refine=0, startup=4, confirm=1, preserve_norm=False)
    settings.pick = PickRule.parse("t7")
    result = tuning.tune(_Scorer(), _Confirmer(), bank, 6, settings.check(), tmp_path / "s.journal", crossfit=_CrossFit)
    assert result.chosen == "t7" and "t7" in {p["id"] for p in result.confirmed}
    assert all(p["resolved"] is None for p in result.confirmed)  # a named point needs no held-out numbers


def test_wilson_interval_of_the_failures_is_what_the_table_prints():
    from refusal_edit.tuning.confirm import Confirmed

    c = Confirmed(2 / 32, 1 / 32, 29 / 32, 0.1, 0.01, 32, 16, 0.0, []).to_json()
    assert c["failure_ci95"] == [round(x, 4) for x in wilson(3, 32)]


def test_each_half_judges_the_other_half_s_prompts_the_base_model_refuses_most():
    """Cross-fitting: the candidates of one half make the edits judged on the other half's harmful prompts,
    most-refused first by the base model's refusal scores (kept with the other half's candidates)."""
    import torch

    from refusal_edit.directions.halves import Half
    from refusal_edit.tuning import crossfit

    prompts = [f"p{i}" for i in range(8)]

    def score(p: str) -> float:  # p<i>: i, or -i if i is odd
        return float(p[1:]) * (-1) ** int(p[1:])

    kept = [
        Half(
            torch.full((2, 4, 3), float(h)),
            torch.zeros(2, 4, 3),
            (4, 3),
            torch.tensor([score(p) for p in prompts[h::2]]),
        )
        for h in (0, 1)
    ]
    folds = crossfit.fold_banks(None, None, None, prompts, prompts, [1], -1, 3, kept=kept)
    assert [float(f.bank.chosen[0]) for f in folds] == [0.0, 1.0]  # fold k's edits draw on half k's candidates
    assert [(f.bank.position, f.bank.layer, f.fitted) for f in folds] == [(-1, 3, (4, 3))] * 2
    assert folds[0].judged == ["p1", "p3", "p5", "p7"]  # scores -1, -3, -5, -7
    assert folds[1].judged == ["p6", "p4", "p2", "p0"]  # scores 6, 4, 2, 0: the most refused first
    with pytest.raises(RefusalEditError, match="position and layer"):
        crossfit.fold_banks(None, None, None, prompts, prompts, [1], None, 3)


def held_point(name, first, multi, failed, prompts=96, prompt_set="h"):
    """A point 0 of 32 on val, judged held out with the failures at these prompt indices (None: counts only,
    as front.json files before per-prompt outcomes were kept)."""
    p = point(name, 0, first, multi, held=(len(failed), prompts))
    if prompt_set is not None:
        p["resolved"] |= {"failed": list(failed), "prompt_set": prompt_set}
    return p


def test_held_out_gaps_are_paired_where_both_points_failed_on_known_prompts():
    """Held out t31 fails 2 of 96, t26 7 - the 2 among the 7 (refusals of edits along one direction concentrate
    on the hardest prompts). Without the margin (the rule's test is then "resolvably more"): paired, t26 is
    resolvably above t31 and loses, and the unjudged t27, less damaging than t31, is judged next; the same
    counts from an old front.json (no per-prompt outcomes) cannot be told apart unpaired: t26 picked."""
    hard = [3, 40]
    points = [
        held_point("t31", 0.190, 0.032, hard),
        held_point("t26", 0.098, 0.014, [*hard, 1, 2, 5, 6, 7]),
        point("t27", 0, 0.166, 0.026),
    ]
    rule = PickRule(margin=None)
    got = pick(points, rule)
    assert points[got.index]["id"] == "t27"
    assert "held-out prompts, resolvably more than t31's" in got.verdicts["t26"]
    assert "gap +5.2 pts, paired 95% CI +0.1 to +11.8" in got.verdicts["t26"]
    assert [points[i]["id"] for i in to_resolve(points, rule, 3)] == ["t27"]
    old = [held_point("t31", 0.190, 0.032, hard, prompt_set=None), held_point("t26", 0.098, 0.014, range(7), 96, None)]
    old_pick = pick([*old, points[2]], rule)
    assert old_pick.verdicts["t26"].endswith(
        "not resolvably above the lowest held-out rate (t31's 2.1% (2/96; 95% CI 0.6-7.3%))"
    )
    assert old_pick.index == 1
    assert to_resolve([*old, points[2]], rule, 3) == []
    # per-prompt outcomes on different prompts (another prompt set) do not pair: unpaired, a tie
    other = held_point("t26", 0.098, 0.014, [*hard, 1, 2, 5, 6, 7], prompt_set="other")
    assert pick([points[0], other], rule).index == 1
    # old records still pick under the default rule (the margin, unpaired): t26 is not shown within 8 points
    default = pick([*old, points[2]])
    assert default.index == 2 and "unpaired 95% CI -1.2 to +12.4" in default.verdicts["t26"]
    assert default.verdicts["t27"].endswith(
        "and within 8 points of the lowest held-out rate (t31's 2.1% (2/96; 95% CI 0.6-7.3%))"
    )


def test_the_margin_rules_out_a_tie_the_prompts_cannot_resolve():
    """6 against 2 of 96, the 2 among the 6: 4 discordant prompts all one way (McNemar's exact p = 0.125), not
    resolved even paired - without the margin a tie that damage decides (t26, as the 2026-12-07 run picked; it
    refused 8 of 100 test prompts to the paper's edit's 1). With the default margin t26 is not shown within
    8 points of t31 and loses; a point failing on the same 2 prompts is (paired +0.0, -4.2 to +4.2) and ties."""
    points = [held_point("t31", 0.190, 0.032, [3, 40]), held_point("t26", 0.098, 0.014, [3, 40, 1, 2, 5, 6])]
    assert pick(points, PickRule(margin=None)).index == 1
    got = pick(points)
    assert got.index == 0
    assert got.verdicts["t26"].endswith(
        "not shown within 8 points of t31's 2.1% (2/96; 95% CI 0.6-7.3%) (gap +4.2 pts, paired 95% CI -0.7 to +10.4)"
    )
    same = held_point("t27", 0.166, 0.026, [3, 40])
    assert pick([*points, same]).index == 2
    # at 4 points not even the same prompts tie: the lowest rate's least damaging point (t27) is the anchor
    tight = pick([*points, same], PickRule(margin=0.04))
    assert tight.index == 2 and "not shown within 4 points of t27's" in tight.verdicts["t31"]


def test_pooled_folds_keep_which_prompts_failed_in_one_numbering():
    from refusal_edit.tuning.crossfit import pooled

    folds = [
        {
            "prompts": 3,
            "refusal_rate": 1 / 3,
            "degenerate_rate": 1 / 3,
            "seconds": 1.0,
            "failed": [0, 2],
            "prompt_set": "a",
        },
        {"prompts": 2, "refusal_rate": 0.5, "degenerate_rate": 0.0, "seconds": 1.0, "failed": [1], "prompt_set": "b"},
    ]
    got = pooled(folds)
    assert got["failed"] == [0, 2, 4] and got["prompt_set"] == "a+b" and got["refused"] + got["degenerate"] == 3
    assert "failed" not in pooled([{k: v for k, v in f.items() if k != "failed"} for f in folds])
