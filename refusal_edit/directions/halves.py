"""The candidates of each half of the train prompts, kept by `extract` beside every candidate.

Why: `tune` cross-fits (`tuning.crossfit`): each half of the train prompts (even-numbered, odd-numbered)
makes candidates, judged on the other half. Those means come out of extract's own pass over the train prompts
(`activations.mean_activations` sums each half too), so extract writes them into `candidates.safetensors` and
tune reads them back instead of running the model over every train prompt again (about 2 of tune's 20
minutes on the demo model). They are used only for the very prompts they were made from (a hash of each
side's list is kept with them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from refusal_edit.directions.bank import CANDIDATES, bank_from_means
from refusal_edit.directions.candidates import CandidateSet
from refusal_edit.edits.spec import DirectionBank
from refusal_edit.prompts.sets import prompt_set

KEY = "train_halves"  # candidates.safetensors metadata: the halves' counts and their prompts' hashes


@dataclass
class Half:
    """One half's candidates (float32 [positions, layers + 1, hidden]) and what went into them."""

    mean_diff: torch.Tensor
    harmless_mean: torch.Tensor
    kept: tuple[int, int]  # harmful, harmless prompts the means kept (after the train filter)
    scores: torch.Tensor  # the base model's refusal score of each of the half's harmful prompts

    def bank(self, position: int, layer: int) -> DirectionBank:
        """The bank `extract` would save for this half, its chosen direction the candidate at (position, layer)."""
        return bank_from_means(self.mean_diff, self.harmless_mean, position, layer)


def train_halves(cands: CandidateSet) -> list[Half]:
    """Both halves of `cands` (made with their halves' sums), as `generate_candidates` would make each alone."""
    out = []
    for h in (0, 1):
        c = cands.half(h)
        kept = (
            (c.harmful.count_kept, c.harmless.count_kept) if c.filtered else (c.harmful.count_all, c.harmless.count_all)
        )
        scores = c.harmful.scores
        out.append(Half(c.mean_diff.float(), c.harmless.mean(c.filtered).float(), kept, scores.float()))
    return out


def halves_tensors(
    halves: Sequence[Half], harmful: Sequence[str], harmless: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata entry that keep `halves` in a candidates file."""
    tensors = {}
    for h, half in enumerate(halves):
        tensors[f"half{h}_mean_diff"] = half.mean_diff.float().contiguous()
        tensors[f"half{h}_harmless_mean"] = half.harmless_mean.float().contiguous()
        tensors[f"half{h}_harmful_scores"] = half.scores.float().contiguous()
    meta = {"kept": [list(h.kept) for h in halves], "harmful": prompt_set(harmful), "harmless": prompt_set(harmless)}
    return tensors, {KEY: json.dumps(meta)}


def load_halves(path: Path, harmful: Sequence[str], harmless: Sequence[str]) -> list[Half] | None:
    """The halves kept in the candidates file `path` for exactly these train prompts, else None (an older
    file, other prompts, or none at all)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(KEY, "null"))
            if not isinstance(meta, dict):
                return None
            if meta.get("harmful") != prompt_set(harmful) or meta.get("harmless") != prompt_set(harmless):
                return None
            out = []
            for h in (0, 1):
                kept = tuple(int(x) for x in meta["kept"][h])
                md, hm = fh.get_tensor(f"half{h}_mean_diff"), fh.get_tensor(f"half{h}_harmless_mean")
                scores = fh.get_tensor(f"half{h}_harmful_scores")
                if md.dim() != 3 or hm.shape != md.shape or scores.numel() != len(range(h, len(harmful), 2)):
                    return None
                if not (torch.isfinite(md).all() and torch.isfinite(hm).all()):
                    return None
                out.append(Half(md.float(), hm.float(), (kept[0], kept[1]), scores.float()))
            return out
    except (SafetensorError, ValueError, KeyError, IndexError, TypeError):
        return None


def halves_beside(direction_path: Path | None, harmful: Sequence[str], harmless: Sequence[str]) -> list[Half] | None:
    """The halves kept in the candidates file beside a direction file, for exactly these train prompts."""
    if direction_path is None:
        return None
    return load_halves(direction_path.parent / CANDIDATES, harmful, harmless)
