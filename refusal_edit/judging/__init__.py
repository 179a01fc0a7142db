"""Judging replies: refusal markers, classifier and LLM judges, degenerate output, reasoning blocks,
and the logit-level scores (refusal score, KL) that direction selection and evaluation share.

This package sits below `directions/` and `evaluation/` and imports neither. Model loading lives in
`judging.load` (imported on demand); everything else takes loaded objects or plain text.
"""

from refusal_edit.judging.base import Judge, MarkerJudge, Verdict
from refusal_edit.judging.classifier import ClassifierJudge, infer_label_map, parse_label_map
from refusal_edit.judging.degenerate import DegenerateRules, degenerate_reason
from refusal_edit.judging.markers import REFUSAL_MARKERS, is_refusal, load_markers, matched_marker
from refusal_edit.judging.panel import Counts, JudgeReport, JudgeStats, cohen_kappa, judge_all
from refusal_edit.judging.reasoning import Split, delimiters_from_template, parse_delimiters, split_reasoning
from refusal_edit.judging.rubric import parse_rubric, strongreject_score
from refusal_edit.judging.scores import kl_divergence, refusal_scores

__all__ = [
    "REFUSAL_MARKERS",
    "ClassifierJudge",
    "Counts",
    "DegenerateRules",
    "Judge",
    "JudgeReport",
    "JudgeStats",
    "MarkerJudge",
    "Split",
    "Verdict",
    "cohen_kappa",
    "degenerate_reason",
    "delimiters_from_template",
    "infer_label_map",
    "is_refusal",
    "judge_all",
    "kl_divergence",
    "load_markers",
    "matched_marker",
    "parse_delimiters",
    "parse_label_map",
    "parse_rubric",
    "refusal_scores",
    "split_reasoning",
    "strongreject_score",
]
