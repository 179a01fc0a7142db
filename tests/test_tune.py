"""`refusal-edit tune` on a tiny model: a valid front, resumable study, and a picked spec whose written
checkpoint equals its hook twin."""

from __future__ import annotations

import contextlib
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch
from tiny import token_batch

from refusal_edit.evaluation.stats import wilson
from refusal_edit.tuning.front import _failure_interval, pareto, spread

FAST = ["--n-train", "6", "--n-val", "4", "--batch-size", "8", "--top-k", "2"]
PERMISSIVE = ["--kl-threshold", "1e9", "--induce-threshold", "-1e9", "--refusal-tokens", "i,as"]
TUNE = [
    "--trials",
    "12",
    "--confirm",
    "2",
    "--n-val",
    "4",
    "--search-prompts",
    "3",
    "--max-new-tokens",
    "6",
    "--batch-size",
    "8",
    "--resolve-prompts",
    "8",
]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tiny model, extracted and tuned once for the whole module (the slow part)."""
    import sys

    from tiny import build, save

    from refusal_edit.cli import main

    root = tmp_path_factory.mktemp("tune")
    src = save(build("qwen2"), root / "model")

    def run(*args):
        argv = sys.argv
        sys.argv = ["refusal-edit", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = argv
        return code

    assert run("extract", src, "--out", root / "direction", *FAST, *PERMISSIVE) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the results table goes to stdout
        assert run("tune", src, "--direction", root / "direction", "--out", root / "tune", *TUNE) == 0
    (root / "tune-stdout.txt").write_text(printed.getvalue())
    return src, root, run


def test_front_is_written_and_valid(tuned):
    _src, root, _run = tuned
    data = json.loads((root / "tune" / "front.json").read_text())
    assert len(data["trials"]) == 12
    seeds = [t for t in data["trials"] if t["seed"]]
    assert len(seeds) >= 5 and seeds[0]["spec"]["attn"] == {"weight": 1.0}  # the paper's edit comes first
    attention_only = [t["spec"] for t in seeds if t["spec"]["mlp"]["weight"] == 0.0]
    assert [(s["direction"], s["embedding"], s["attn"]["weight"]) for s in attention_only] == [("layer", 0.0, 1.0)]
    for t in data["trials"]:
        assert 0 <= t["refusal_proxy"] <= 1 and t["kl_proxy"] >= 0
    confirmed = data["confirmed"]
    # up to 2 front points, the paper's edit when it is not one of them, every bridge point (the KL-matched
    # one too) when it is not one of them either
    assert any(p["reference"] for p in confirmed)
    bridge = [t["number"] for t in data["trials"] if t["bridge"]]
    paper_kl = data["trials"][0]["kl_proxy"]
    within = {t["number"] for t in data["trials"] if t["bridge"] and t["kl_proxy"] <= paper_kl}
    assert bridge[:2] == [9, 10] and {p["trial"] for p in confirmed if p["bridge"]} == within
    assert len([p for p in confirmed if not (p["bridge"] or p["reference"])]) <= 2
    for p in confirmed:
        c = p["confirmed"]
        assert c["prompts"] == 4 and c["kl_prompts"] == 3
        assert abs(c["refusal_rate"] + c["degenerate_rate"] + c["complied_rate"] - 1) < 1e-9
        lo, hi = c["refusal_ci95"]  # Wilson's interval of the count behind the rate
        assert lo <= c["refusal_rate"] <= hi and (lo, hi) != (0.0, 1.0)
        assert c["first_token_kl"] >= 0 and c["multi_token_kl"] is not None
        # which val prompts failed, on one prompt list for every point: the pick pairs their gaps
        assert len(c["failed"]) == round((c["refusal_rate"] + c["degenerate_rate"]) * 4)
        assert set(c["failed"]) <= set(range(4)) and c["prompt_set"] == confirmed[0]["confirmed"]["prompt_set"]
    assert data["chosen"] in {p["id"] for p in confirmed}
    # the pick: the default rule, a verdict for every confirmed point; the points that could be picked judged
    # again on the cross-fitted train prompts (extract's 6: 3 per half), the lowest val rate among them
    assert data["pick"]["kind"] == "least-damage" and data["pick"]["max_kl"] is None
    assert set(data["pick"]["verdicts"]) == {p["id"] for p in confirmed}
    assert data["pick"]["verdicts"][data["chosen"]].startswith("picked")
    judged = [p for p in confirmed if p["resolved"]]
    assert len(judged) >= 1 and data["timings"]["resolve_s"] > 0
    for p in judged:
        r = p["resolved"]
        assert r["prompts"] == 6 and [f["prompts"] for f in r["folds"]] == [3, 3]
        assert tuple(r["failure_ci95"]) == pytest.approx(wilson(r["refused"] + r["degenerate"], 6), abs=1e-4)
        assert len(r["failed"]) == r["refused"] + r["degenerate"] and set(r["failed"]) <= set(range(6))
        assert r["prompt_set"] == judged[0]["resolved"]["prompt_set"]
    table = (root / "tune-stdout.txt").read_text()  # every judged rate with its interval, as front.json has it
    assert "held-out:" in table  # the headers wrap; the intervals (no spaces) stay whole
    for p in confirmed:
        for key in ("refusal_ci95", "failure_ci95"):
            lo, hi = p["confirmed"][key]
            assert f"({100 * lo:.0f}%-{100 * hi:.0f}%)" in table
        if p["resolved"]:
            lo, hi = p["resolved"]["failure_ci95"]
            assert f"({100 * lo:.0f}%-{100 * hi:.0f}%)" in table
    assert data["direction"]["candidates"] is True
    assert (root / "tune" / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "tune" / "study.journal").is_file()


def test_the_search_ends_with_a_bridge_to_the_paper_and_its_kl_matched_point(tuned):
    from refusal_edit.tuning.front import pareto
    from refusal_edit.tuning.run import BRIDGE_STEPS, DOWNSTREAM_BRIDGE_STEPS

    _src, root, _run = tuned
    trials = json.loads((root / "tune" / "front.json").read_text())["trials"]
    earlier = trials[:9]  # a quarter of 12 trials refine, last
    paper = earlier[0]["spec"]  # the paper's edit is the first seed (test_front_is_written_and_valid)
    paper_kl = earlier[0]["kl_proxy"]
    front = [t for t in pareto(earlier, lambda t: (t["refusal_proxy"], t["kl_proxy"])) if t["kl_proxy"] < paper_kl]
    shape = min(front, key=lambda t: t["refusal_proxy"])["spec"]
    per_layer = shape["direction"] == "layer"
    steps = DOWNSTREAM_BRIDGE_STEPS if per_layer else BRIDGE_STEPS
    bridge = [t for t in trials if t["refine"] and not t["matched"]]
    assert [t["number"] for t in bridge] == list(range(9, 9 + len(steps)))
    assert all(t["bridge"] for t in bridge) and [t["bridge_step"] for t in bridge] == list(steps)
    matched = [t for t in trials if t["matched"]]
    assert len(trials) == 12
    if len(steps) < 3:  # the slot left: the KL-matched point, unless no step matches (then a sampled trial)
        assert [t["number"] for t in matched] in ([], [11])
    else:
        assert matched == []

    def weights(spec):
        return [spec[site].get("weight", 0.0) for site in ("attn", "mlp")] + [spec["embedding"]]

    # The bridge: every weight a fraction of the way to the paper's (1.0), the shape's direction kept - a
    # per-layer shape's with the selected direction upstream of its layer.
    for t in bridge + matched:
        step = t["bridge_step"]
        expected = [w + step * (p - w) for w, p in zip(weights(shape), weights(paper), strict=True)]
        assert weights(t["spec"]) == pytest.approx(expected, abs=1e-9)
        assert t["spec"]["direction"] == ("downstream" if per_layer else shape["direction"])


def test_resume_continues_and_force_is_needed_to_restart(tuned):
    src, root, run = tuned
    assert run("tune", src, "--direction", root / "direction", "--out", root / "tune", *TUNE) == 1  # exists
    more = [a if a != "12" else "14" for a in TUNE]
    assert run("tune", src, "--direction", root / "direction", "--out", root / "tune", *more, "--resume") == 0
    data = json.loads((root / "tune" / "front.json").read_text())
    assert len(data["trials"]) == 14
    first = [t["spec"] for t in data["trials"][:12]]
    assert first[0]["attn"] == {"weight": 1.0}


def test_spec_written_by_orthogonalize_equals_its_hook_twin(tuned, tmp_path):
    from transformers import AutoModelForCausalLM

    from refusal_edit.directions.bank import load_bank
    from refusal_edit.edits.spec import EditSpec, resolve
    from refusal_edit.interventions import edit_hooks

    src, root, run = tuned
    data = json.loads((root / "tune" / "front.json").read_text())
    point = next(p for p in data["confirmed"] if not EditSpec.from_json(p["spec"]).preserve_norm)
    out = tmp_path / "edited"
    assert run("orthogonalize", src, "--spec", f"{root / 'tune' / 'front.json'}#{point['id']}", "--out", out) == 0
    record = json.loads((out / "refusal_edit.json").read_text())
    assert record["mode"] == "ablate" and record["spec"]["edit"] == point["spec"]
    assert record["spec"]["confirmed"]["first_token_kl"] == point["confirmed"]["first_token_kl"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    bank, _ = load_bank(root / "direction")
    edit = resolve(EditSpec.from_json(point["spec"]), bank, 3)
    x = token_batch()
    with torch.no_grad(), edit_hooks(model, edit):
        reference = model(x).logits
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(x).logits
    assert (logits - reference).abs().max().item() <= 1e-4


def test_front_helpers():
    front = pareto([(1, 5), (2, 2), (3, 3), (5, 1)], key=lambda p: p)
    assert front == [(1, 5), (2, 2), (5, 1)]
    assert spread(list(range(10)), 3, key=float) == [0, 4, 9]
    # front.png's bars: the interval of refused-or-degenerate replies, from the counts behind the rates
    c = {"prompts": 32, "refusal_rate": 2 / 32, "degenerate_rate": 1 / 32}
    assert _failure_interval(c) == wilson(3, 32)


def test_row_grouped_hooks_equal_one_edit_per_pass():
    """Confirmation generates several points in one batch: each group of rows must see exactly its own edit."""
    from tiny import build, mixed_edits

    from refusal_edit.interventions import RowGroups, edit_hooks, edit_hooks_by_row

    model = build("gemma2")  # sandwich norms: the per-writer basis differs from r
    edits = mixed_edits()
    x = token_batch(batch=2)
    groups = RowGroups([0, 0, 1, 1, 2, 2])
    batch = torch.cat([x, x, x])
    with torch.no_grad(), edit_hooks_by_row(model, edits, groups):
        groups.select(range(6))
        together = model(batch).logits
    for i, edit in enumerate(edits):
        with torch.no_grad():
            if edit is None:
                alone = model(x).logits
            else:
                with edit_hooks(model, edit):
                    alone = model(x).logits
        assert (together[2 * i : 2 * i + 2] - alone).abs().max().item() <= 1e-5


def test_a_per_layer_shape_is_bridged_with_the_selected_direction_upstream():
    """The bridge from a per-layer shape runs in its `downstream` form (from the shape itself on), set per trial
    by a user attribute the sampler never draws; the weaker sweep keeps the shape's own direction."""
    from types import SimpleNamespace

    import optuna

    from refusal_edit.edits.spec import EditSpec
    from refusal_edit.tuning.run import DOWNSTREAM_BRIDGE_STEPS, REFINE_FACTORS, TuneSettings, _refinements
    from refusal_edit.tuning.space import BRIDGE_DIRECTION, SearchSpace

    space = SearchSpace(n_layers=6, direction_layer=3, per_layer=True, harmless_means=False, preserve_norm=False)
    complete = optuna.trial.TrialState.COMPLETE
    paper = space.params()
    shape = space.params(weight=1.2, mlp=0.2, peak=3.0, width=2.0, floor=0.1, embedding=0.5, direction="layer")

    def done(number: int, params: dict, values: list[float], spec: dict) -> SimpleNamespace:
        return SimpleNamespace(number=number, params=params, values=values, user_attrs={"spec": spec}, state=complete)

    trials = [done(0, paper, [0.10, 0.20], EditSpec().to_json()), done(1, shape, [0.15, 0.05], {"direction": "layer"})]
    out, plan = _refinements(SimpleNamespace(trials=trials), space, TuneSettings(trials=24, refine=6))
    bridge = {"bridge": True, BRIDGE_DIRECTION: "downstream"}
    steps = [{"bridge_step": s} for s in DOWNSTREAM_BRIDGE_STEPS]
    assert [a for _, a in out] == [bridge | s for s in steps] + [{"bridge": False}] * 2
    # the sixth slot waits for the KL-matched point: the plan keeps the bridge's ends
    assert plan == {"start": shape, "end": paper, "attrs": bridge, "start_trial": 1, "reference_trial": 0}
    assert _refinements(SimpleNamespace(trials=trials), space, TuneSettings(trials=24, refine=3))[1] is None
    for (params, _), step in zip(out, DOWNSTREAM_BRIDGE_STEPS, strict=False):
        assert params["attn_weight"] == pytest.approx(1.2 + step * (1.0 - 1.2))
        assert params["direction"] == "layer"  # the sampler's own choice, overridden by the attribute
    assert [p["mlp_weight"] for p, _ in out[3:]] == pytest.approx([0.2 * f for f in REFINE_FACTORS])

    study = optuna.create_study(directions=["minimize", "minimize"])
    study.enqueue_trial(out[1][0], user_attrs=out[1][1])
    study.enqueue_trial(out[3][0], user_attrs=out[3][1])
    got = []
    study.optimize(lambda trial: got.append(space.suggest(trial)) or (0.0, 0.0), n_trials=2)
    assert [s.direction for s in got] == ["downstream", "layer"]


def test_the_kl_matched_step_interpolates_the_bridge_to_the_paper_s_kl():
    """The bridge's KL-matched point: where its first-token KL proxy, interpolated between the measured steps,
    reaches the paper's edit's (the demo model's bridge: 0.098, 0.166, 0.215 at 0, 0.4, 0.7; the paper's 0.190)."""
    from refusal_edit.tuning.run import matched_step

    demo = [(0.0, 0.098), (0.4, 0.166), (0.7, 0.215)]
    assert matched_step(demo, 0.190) == pytest.approx(0.4 + 0.3 * (0.190 - 0.166) / (0.215 - 0.166), abs=1e-3)
    assert matched_step(demo, 0.25) == pytest.approx(0.7 + 0.3 * (0.25 - 0.215) / (0.215 - 0.166), abs=1e-3)
    assert matched_step(demo, 5.0) is None  # the whole way at most, and that is the paper's weights: nothing new
    assert matched_step(demo, 0.05) is None  # the shape itself already damages more
    assert matched_step(demo, 0.167) is None  # 0.41: next to a measured step, nothing new
    assert matched_step([(0.0, 0.1), (0.4, 0.2), (0.7, 0.18)], 0.25) is None  # no rise at the end to follow
    assert matched_step([(0.0, 0.1), (0.4, 0.3), (0.7, 0.2)], 0.25) == pytest.approx(0.3)  # the first crossing
    assert matched_step([(0.0, 0.1)], 0.2) is None and matched_step([], 0.2) is None


def test_the_kl_matched_point_is_searched_after_the_bridge_and_confirmed_with_it():
    """A study whose bridge leaves a slot: the matched trial comes last, between the bridge's ends at the
    interpolated step, with the bridge's attributes; a study without a crossing gives the slot to the sampler."""
    import optuna

    from refusal_edit.tuning.run import BRIDGE_PLAN, _matched
    from refusal_edit.tuning.space import SearchSpace

    space = SearchSpace(n_layers=6, direction_layer=3, per_layer=False, harmless_means=False, preserve_norm=False)
    paper = space.params()
    shape = space.params(weight=1.2, mlp=0.2, peak=3.0, width=2.0, floor=0.1, embedding=0.5)
    study = optuna.create_study(directions=["minimize", "minimize"])
    plan = {"start": shape, "end": paper, "attrs": {"bridge": True}, "start_trial": 1, "reference_trial": 0}
    study.set_user_attr(BRIDGE_PLAN, plan)
    kl = iter([0.19, 0.10, 0.15, 0.21])  # the paper's edit, the shape, the bridge at 0.4 and 0.7
    attrs = [{}, {}, {"bridge_step": 0.4}, {"bridge_step": 0.7}]
    for params, a in zip(
        [paper, shape, space.between(shape, paper, 0.4), space.between(shape, paper, 0.7)], attrs, strict=True
    ):
        study.enqueue_trial(params, user_attrs=a)
    study.optimize(lambda trial: (0.0, next(kl)), n_trials=4)
    params, got = _matched(study, space, plan)
    assert got == {"bridge": True, "bridge_step": 0.6, "matched": True}
    assert params["attn_weight"] == pytest.approx(1.2 + 0.6 * (1.0 - 1.2))
    plan_without_crossing = plan | {"reference_trial": 1}  # target 0.10: the shape itself is there already
    assert _matched(study, space, plan_without_crossing) is None


class _StandInScorer:
    """Stand-in proxies (no model): refusal falls and KL rises with strength, and any direction but the
    selected one refuses less and costs KL, so a bridge from a per-layer shape ends above the paper's KL."""

    base = SimpleNamespace(refusal=0.5, refusal_logodds=0.0)

    def score(self, spec, bank):
        from refusal_edit.tuning.proxies import ProxyScores

        s = spec.to_json()
        strength = (s["attn"]["weight"] + s["mlp"]["weight"] + s["embedding"]) / 3
        other = s["direction"] != "chosen"
        refusal = math.exp(-2 * strength) * (0.3 if other else 1.0)
        return ProxyScores(refusal, 0.1 * strength**2 + 0.05 * other, math.log(refusal))


def test_search_runs_the_kl_matched_point_last_after_the_bridge_it_needs(tmp_path, monkeypatch):
    """The whole search on stand-in proxies: the bridge's KL crosses the paper's on the way. The last trial is
    the KL-matched one, at the step `matched_step` gives from the measured trials, between the bridge's ends;
    a resumed study does not add it again."""
    from refusal_edit.tuning import run as tuning
    from refusal_edit.tuning.space import SearchSpace

    space = SearchSpace(n_layers=6, direction_layer=3, per_layer=True, harmless_means=False, preserve_norm=False)
    settings = tuning.TuneSettings(trials=16, refine=6, startup=4)
    storage = tmp_path / "study.journal"
    trials = tuning.search(_StandInScorer(), space, None, settings, storage)
    assert len(trials) == 16
    *rest, last = trials
    assert last["matched"] and last["bridge"] and last["refine"]
    bridge = [t for t in rest if t["bridge_step"] is not None]
    assert bridge and all(t["number"] >= 12 for t in bridge)
    points = {t["bridge_step"]: t["kl_proxy"] for t in bridge}
    study = tuning._study(storage, settings, resume=True)
    plan = study.user_attrs[tuning.BRIDGE_PLAN]
    if 0.0 not in points:
        points[0.0] = trials[plan["start_trial"]]["kl_proxy"]
    paper_kl = trials[plan["reference_trial"]]["kl_proxy"]
    step = tuning.matched_step(sorted(points.items()), paper_kl)
    assert step is not None and last["bridge_step"] == step
    expected = space.between(plan["start"], plan["end"], step)
    assert last["spec"]["attn"]["weight"] == pytest.approx(expected["attn_weight"])
    assert last["kl_proxy"] == pytest.approx(paper_kl, rel=0.1)  # about the paper's damage, as meant
    again = tuning.search(_StandInScorer(), space, None, settings, storage, resume=True)
    assert [t["number"] for t in again] == [t["number"] for t in trials]


def test_bridge_points_that_damage_more_than_the_paper_s_edit_are_not_confirmed(tmp_path, monkeypatch):
    """Confirmation takes the bridge's points with no more KL proxy than the paper's edit (as for the front's
    points) and its KL-matched point (at the paper's KL, whichever side the interpolation landed); the ones past
    it are searched, not confirmed."""
    from refusal_edit.tuning import run as tuning
    from refusal_edit.tuning.confirm import Confirmed

    class Confirmer:
        def measure(self, points, bank):
            self.labels = [label for label, _ in points]
            return [Confirmed(0.1, 0.0, 0.9, 0.1, 0.01, 4, 3, 0.0, []) for _ in points]

    bank = SimpleNamespace(layer=3, mean_diff=object(), harmless_mean=None)
    settings = tuning.TuneSettings(trials=16, refine=6, startup=4, confirm=2, preserve_norm=False)
    confirmer = Confirmer()
    result = tuning.tune(_StandInScorer(), confirmer, bank, 6, settings, tmp_path / "study.journal")
    paper_kl = result.trials[0]["kl_proxy"]
    bridge = [t for t in result.trials if t["bridge"]]
    above = [t["number"] for t in bridge if t["kl_proxy"] > paper_kl and not t["matched"]]
    assert above, "the stand-in bridge ends above the paper's KL"
    confirmed = {p["trial"] for p in result.confirmed}
    assert not confirmed & set(above)
    assert {t["number"] for t in bridge if t["kl_proxy"] <= paper_kl or t["matched"]} <= confirmed
    (matched,) = [t for t in bridge if t["matched"]]
    assert matched["kl_proxy"] == pytest.approx(paper_kl, rel=0.1)
    assert confirmer.labels[0] == "base" and len(confirmer.labels) == len(result.confirmed) + 1


def test_confirm_cross_fits_every_front_point_on_the_train_prompts(tuned, tmp_path):
    """`refusal-edit confirm --cross-fit` (bench/confirm.py's, moved into the package): every front point judged
    on the half of the 240 built-in train prompts its candidates never saw, the counts pooled, the KLs measured."""
    src, root, run = tuned
    out = tmp_path / "crossfit.json"
    front = root / "tune" / "front.json"
    given = ["--direction", root / "direction", "--points", front, "--out", out, "--kl-prompts", "3"]
    given += ["--max-new-tokens", "6", "--batch-size", "8", "--device", "cpu"]
    assert run("confirm", src, *given, "--cross-fit") == 0
    data = json.loads(out.read_text())
    ids = [p["id"] for p in json.loads(front.read_text())["confirmed"]]
    assert data["split"] == "train" and data["cross_fit"] and list(data["points"]) == ids
    for numbers in data["points"].values():
        assert numbers["prompts"] == 240 and [f["prompts"] for f in numbers["folds"]] == [120, 120]
        failed = numbers["refused"] + numbers["degenerate"]
        assert failed <= 240 and numbers["first_token_kl"] >= 0 and numbers["multi_token_kl"] is not None
        assert tuple(numbers["failure_ci95"]) == pytest.approx(wilson(failed, 240), abs=1e-4)
    assert run("confirm", src, *given) == 1  # the result exists: replaced only with --force


def test_cross_fitting_reads_the_halves_extract_kept_instead_of_a_pass_of_its_own(tuned, tmp_path, monkeypatch):
    """extract keeps each half's candidates; tune's held-out judging reads them (no candidates pass) and judges
    what one pass over the train prompts would have made."""
    import shutil

    from refusal_edit.tuning import crossfit
    from refusal_edit.workflows import tune as tune_workflow

    src, root, run = tuned
    resolved = {}
    for name in ("kept", "made"):
        out = tmp_path / name
        shutil.copytree(root / "tune", out)
        if name == "kept":
            monkeypatch.setattr(crossfit, "generate_candidates", lambda *a, **k: pytest.fail("a candidates pass"))
        else:
            monkeypatch.undo()
            monkeypatch.setattr(tune_workflow, "halves_beside", lambda *a: None)
        assert run("tune", src, "--direction", root / "direction", "--out", out, "--resume", *TUNE) == 0
        data = json.loads((out / "front.json").read_text())
        resolved[name] = {p["id"]: p["resolved"] and p["resolved"]["failed"] for p in data["confirmed"]}
    assert any(v is not None for v in resolved["kept"].values())  # cross-fitting ran
    assert resolved["kept"] == resolved["made"]
