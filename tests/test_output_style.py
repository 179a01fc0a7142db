"""How output reads (issue 32's polish): no tqdm bars and no wrapped notes in logs, plan summaries and model
cards in plain words."""

from __future__ import annotations

import subprocess
import sys

from refusal_edit.checkpoint.card import render_card
from refusal_edit.checkpoint.record import EditRecord
from refusal_edit.cli.archs import plan_summary

PIPED = """
from refusal_edit.cli.app import quiet_libraries
quiet_libraries()
from tqdm.auto import tqdm
for _ in tqdm(range(3), desc="converting"):
    pass
from refusal_edit.console import err
err.print("note: " + "a long note " * 20 + "end")
"""


def test_piped_stderr_gets_no_progress_bars_and_one_line_per_note():
    done = subprocess.run([sys.executable, "-c", PIPED], capture_output=True, text=True, check=True, timeout=120)
    assert "converting" not in done.stderr and "\r" not in done.stderr  # transformers' tqdm bars are for terminals
    notes = [line for line in done.stderr.splitlines() if line.strip()]
    assert notes == ["note: " + "a long note " * 20 + "end"]  # 246 characters, not wrapped at 80 or 120


def test_a_plan_that_edits_nothing_says_so_plainly():
    assert plan_summary([]) == "0 tensors edited, 0 created"


def test_the_model_card_says_which_matrices_in_plain_english():
    fields = {"base_model": "org/base", "direction_sha256": "0" * 64, "name": "tiny-abliterated"}
    assert "every matrix that writes into the residual stream." in render_card(EditRecord(mode="ablate", **fields))
    spec = render_card(EditRecord(mode="ablate", spec={"edit": {"rank": 2}}, **fields))
    assert "the matrices that write into the residual stream, as the spec below describes." in spec
