"""`tune`: a refusal-vs-damage front over the edit variants, searched with Optuna and confirmed by generation."""

from refusal_edit.tuning.confirm import Confirmed, Confirmer
from refusal_edit.tuning.front import plot_front
from refusal_edit.tuning.pick import Picked, PickRule, pick
from refusal_edit.tuning.proxies import ProxyScorer, applied
from refusal_edit.tuning.run import TuneResult, TuneSettings, tune
from refusal_edit.tuning.space import SearchSpace

__all__ = [
    "Confirmed",
    "Confirmer",
    "PickRule",
    "Picked",
    "ProxyScorer",
    "SearchSpace",
    "TuneResult",
    "TuneSettings",
    "applied",
    "pick",
    "plot_front",
    "tune",
]
