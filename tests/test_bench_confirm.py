"""bench/confirm.py's file handling (no models): which points it reads, and what its --out may replace."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
_spec = importlib.util.spec_from_file_location("bench_confirm", BENCH / "confirm.py")
assert _spec is not None and _spec.loader is not None
confirm = importlib.util.module_from_spec(_spec)
sys.modules["bench_confirm"] = confirm
_spec.loader.exec_module(confirm)


def test_points_come_from_a_label_map_or_every_confirmed_point_of_a_front(tmp_path):
    labels = tmp_path / "points.json"
    labels.write_text(json.dumps({"paper": {}, "weaker": {"attn": {"weight": 0.9}}}))
    assert confirm.load_points(labels) == {"paper": {}, "weaker": {"attn": {"weight": 0.9}}}
    front = tmp_path / "front.json"
    front.write_text(json.dumps({"confirmed": [{"id": "t0", "spec": {}}, {"id": "t26", "spec": {"embedding": 0.7}}]}))
    assert confirm.load_points(front) == {"t0": {}, "t26": {"embedding": 0.7}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read --points"),
        ("{", "cannot read --points"),
        ("[1]", "expected {label: spec}"),
        ("{}", "expected"),
    ],
)
def test_bad_points_files_are_one_error_line(tmp_path, text, message):
    path = tmp_path / "points.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        confirm.load_points(path)
    assert str(exc.value).startswith("error: ") and message in str(exc.value) and "\n" not in str(exc.value)


def test_out_never_replaces_the_points_file_or_an_existing_file_without_force(tmp_path):
    points = tmp_path / "front.json"
    points.write_text('{"confirmed": []}')
    link = tmp_path / "link.json"
    link.symlink_to(points)
    other = tmp_path / "old.json"
    other.write_text("keep")
    for out, force in ((points, True), (link, True)):
        with pytest.raises(SystemExit, match="is the --points file"):
            confirm.check_out(out, points, force)
    with pytest.raises(SystemExit, match=r"exists \(--force replaces it\)"):
        confirm.check_out(other, points, False)
    with pytest.raises(SystemExit, match="is a directory"):
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
