"""Load the vectors an edit variant can draw on: a direction file and, beside it, every candidate.

`extract` writes `candidates.safetensors` next to `direction.safetensors` (every layer's and position's
difference in means, and the harmless means). Per-layer, interpolated, projected and subspace edits need
it; the paper's plain edit does not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from refusal_edit.directions.artifacts import DirectionFile, load_direction
from refusal_edit.directions.candidates import CandidateSet
from refusal_edit.edits.spec import DirectionBank
from refusal_edit.errors import RefusalEditError

CANDIDATES = "candidates.safetensors"


def load_bank(direction: str | Path | DirectionFile) -> tuple[DirectionBank, DirectionFile]:
    """The bank of `direction` (a file or a run folder) and the direction file itself."""
    d = direction if isinstance(direction, DirectionFile) else load_direction(direction)
    chosen = d.mean_diff if d.mean_diff is not None else d.direction
    bank = DirectionBank(chosen.float(), position=d.position, layer=d.layer)
    path = d.path.parent / CANDIDATES if d.path is not None else None
    if path is None or not path.is_file():
        return bank, d
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            tensors = {k: fh.get_tensor(k).float() for k in ("mean_diff", "harmless_mean") if k in keys}
    except SafetensorError as exc:
        raise RefusalEditError(f"{path.name} is not a valid safetensors file: {exc}") from exc
    md = tensors.get("mean_diff")
    if md is None or md.dim() != 3 or md.shape[-1] != bank.hidden:
        raise RefusalEditError(f"{path.name}: expected mean_diff [positions, layers + 1, {bank.hidden}]")
    hm = tensors.get("harmless_mean")
    if hm is not None and hm.shape != md.shape:
        raise RefusalEditError(f"{path.name}: harmless_mean and mean_diff have different shapes")
    if not torch.isfinite(md).all() or (hm is not None and not torch.isfinite(hm).all()):
        raise RefusalEditError(f"{path.name} contains NaN or infinite values")
    bank.mean_diff, bank.harmless_mean = md, hm
    return bank, d


def bank_from_candidates(cands: CandidateSet, position: int, layer: int) -> DirectionBank:
    """The bank `extract` would save for `cands`, its chosen direction the candidate at (`position`, `layer`).

    Why: comparing edits on the prompts their candidates came from favours the edits with more fitted
    directions (each layer's own candidate over one selected direction); a bank from part of the train
    prompts lets the rest judge every edit fairly (`tuning.crossfit`).
    """
    return bank_from_means(cands.mean_diff.float(), cands.harmless.mean(cands.filtered).float(), position, layer)


def bank_from_means(mean_diff: torch.Tensor, harmless_mean: torch.Tensor, position: int, layer: int) -> DirectionBank:
    """A bank from candidates [positions, layers + 1, hidden] and their harmless means, its chosen direction the
    candidate at (`position`, `layer`)."""
    n_pos, n_layers = mean_diff.shape[0], mean_diff.shape[1] - 1
    if not -n_pos <= position < 0 or not 0 <= layer <= n_layers:
        raise RefusalEditError(f"no candidate at position {position}, layer {layer}")
    chosen = mean_diff[n_pos + position, layer].float()
    return DirectionBank(chosen, position=position, layer=layer, mean_diff=mean_diff, harmless_mean=harmless_mean)
