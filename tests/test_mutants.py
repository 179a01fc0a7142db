"""The planted bugs of tests/mutants.py: each still applies to the code, and the suite kills every one."""

from __future__ import annotations

import pytest
from mutants import MUTANTS, Mutant, StaleMutant, check, run


def test_every_mutant_still_applies_exactly_once():
    stale = []
    for mutant in MUTANTS:
        try:
            check(mutant)
        except StaleMutant as exc:
            stale.append(str(exc))
    assert not stale, "\n".join(stale)


def test_a_mutant_whose_text_moved_fails_loudly(tmp_path):
    moved = Mutant("moved", "refusal_edit/arch.py", "no such text", "x", ())
    with pytest.raises(StaleMutant, match=r"moved: its old text in refusal_edit/arch\.py occurs 0 times"):
        check(moved)
    with pytest.raises(StaleMutant, match="is missing"):
        check(MUTANTS[0], tmp_path)


def test_every_fast_mutant_is_killed():
    """Runs the tests named by each mutant in a copy of the checkout with the bug planted (~35 s on 2 idle cores
    for the whole list; `make mutants` runs them all)."""
    outcomes = run([m for m in MUTANTS if m.fast])
    survivors = [f"{o.mutant.name} (pytest exit {o.code}):\n{o.tail[-1500:]}" for o in outcomes if not o.killed]
    assert not survivors, "\n".join(survivors)
