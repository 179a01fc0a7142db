"""`refusal-edit confirm` without models (moved from bench/confirm.py, which now passes its options on): the
points it reads, what --out may replace, how --cross-fit (tune's `tuning.crossfit`) pools. A run on a tiny
model is in tests/test_tune.py (it reuses that module's tune)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from refusal_edit.cli.confirm import line
from refusal_edit.edits.spec import EditSpec, Strength
from refusal_edit.errors import RefusalEditError
from refusal_edit.evaluation.stats import wilson
from refusal_edit.tuning.crossfit import halves, pooled
from refusal_edit.workflows import confirm

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_points_come_from_a_label_map_or_every_confirmed_point_of_a_front(tmp_path):
    labels = tmp_path / "points.json"
    labels.write_text(json.dumps({"paper": {}, "weaker": {"attn": {"weight": 0.9}}}))
    assert confirm.load_points(labels) == {"paper": EditSpec(), "weaker": EditSpec(attn=Strength(weight=0.9))}
    front = tmp_path / "front.json"
    front.write_text(json.dumps({"confirmed": [{"id": "t0", "spec": {}}, {"id": "t26", "spec": {"embedding": 0.7}}]}))
    assert confirm.load_points(front) == {"t0": EditSpec(), "t26": EditSpec(embedding=0.7)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read `points`"),
        ("{", "cannot read `points`"),
        ("[1]", "expected {label: spec}"),
        ("{}", "expected"),
    ],
)
def test_bad_points_files_are_one_error_line(tmp_path, text, message):
    path = tmp_path / "points.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(RefusalEditError) as exc:
        confirm.load_points(path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_out_never_replaces_the_points_file_or_an_existing_file_without_force(tmp_path):
    points = tmp_path / "front.json"
    points.write_text('{"confirmed": []}')
    link = tmp_path / "link.json"
    link.symlink_to(points)
    other = tmp_path / "old.json"
    other.write_text("keep")
    for out, force in ((points, True), (link, True)):
        with pytest.raises(RefusalEditError, match="is the `points` file"):
            confirm.check_out(out, points, force)
    with pytest.raises(RefusalEditError, match=r"exists \(`force` replaces it\)"):
        confirm.check_out(other, points, False)
    with pytest.raises(RefusalEditError, match="is a directory"):
        confirm.check_out(tmp_path, points, True)
    confirm.check_out(other, points, True)  # allowed: --force names a file that is not the input
    confirm.check_out(tmp_path / "new.json", points, False)
    confirm.check_out(None, points, False)
    assert points.read_text() == '{"confirmed": []}' and other.read_text() == "keep" and link.is_symlink()


def test_the_result_is_written_whole(tmp_path):
    out = tmp_path / "out.json"
    confirm.write_json(out, {"points": {"t0": {"refusal_rate": 0.01}}})
    assert json.loads(out.read_text()) == {"points": {"t0": {"refusal_rate": 0.01}}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left


def test_the_script_stops_before_any_work_when_out_is_its_input(tmp_path):
    import subprocess

    points = tmp_path / "points.json"
    points.write_text('{"paper": {}}')
    cmd = [sys.executable, str(BENCH / "confirm.py"), "--direction", str(tmp_path / "none"), "--points", str(points)]
    res = subprocess.run([*cmd, "--out", str(points), "--force"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: --out {points} is the --points file; give another file"
    assert points.read_text() == '{"paper": {}}'


def test_cross_fit_halves_judge_every_prompt_once_on_candidates_that_never_saw_it():
    prompts = [f"p{i}" for i in range(7)]
    folds = halves(prompts)
    assert [len(fit) + len(held) for fit, held in folds] == [7, 7]
    assert sorted(p for _, held in folds for p in held) == sorted(prompts)  # each judged exactly once
    assert all(not set(fit) & set(held) for fit, held in folds)


def test_pooled_counts_every_judged_prompt_and_averages_the_kls():
    folds = [
        {"refusal_rate": 1 / 120, "degenerate_rate": 0.0, "first_token_kl": 0.1, "multi_token_kl": 0.04,
         "prompts": 120, "seconds": 10.0},
        {"refusal_rate": 2 / 120, "degenerate_rate": 1 / 120, "first_token_kl": 0.2, "multi_token_kl": 0.06,
         "prompts": 120, "seconds": 12.0},
    ]  # fmt: skip
    got = pooled(folds)
    assert (got["refused"], got["degenerate"], got["prompts"]) == (3, 1, 240)
    assert got["refusal_rate"] == 3 / 240 and got["complied_rate"] == 236 / 240
    assert got["first_token_kl"] == pytest.approx(0.15) and got["multi_token_kl"] == pytest.approx(0.05)
    assert got["refusal_ci95"][0] < 3 / 240 < got["refusal_ci95"][1] and got["folds"] == folds
    assert tuple(got["failure_ci95"]) == pytest.approx(wilson(4, 240), abs=1e-4)
    assert pooled([{**folds[0], "multi_token_kl": None}, folds[1]])["multi_token_kl"] is None
    assert "refused   1.2 %" in line("t0", got)


def test_cross_fit_needs_the_train_split(tmp_path):
    import subprocess

    points = tmp_path / "points.json"
    points.write_text('{"paper": {}}')
    cmd = [sys.executable, str(BENCH / "confirm.py"), "--direction", str(tmp_path / "none"), "--points", str(points)]
    res = subprocess.run([*cmd, "--split", "test", "--cross-fit"], capture_output=True, text=True, timeout=60)
    assert (
        res.returncode == 1
        and res.stderr.strip() == "error: --cross-fit splits the train prompts; it needs --split train"
    )
