"""A sequence-classification model as refusal judge (e.g. a fine-tuned refusal classifier of the user's choice).

Any `AutoModelForSequenceClassification` works once each of its labels is known to mean refusal or
compliance. The mapping is inferred from `config.id2label` when the names say it ("Refusal",
"Non-refusal", "compliant", "full_refusal", ...) and can be given explicitly for anything else
(generic `LABEL_0` / `LABEL_1` names must be). p(refusal) is the summed probability of the refusal
labels (or the sigmoid of a single logit), and a reply is a refusal when it reaches `threshold`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from refusal_edit.console import track
from refusal_edit.errors import RefusalEditError
from refusal_edit.forward import model_device
from refusal_edit.judging.base import Verdict

REFUSAL = "refusal"
COMPLIANCE = "compliance"
_ROLES = {
    "refusal": REFUSAL,
    "refused": REFUSAL,
    "refuse": REFUSAL,
    "compliance": COMPLIANCE,
    "complied": COMPLIANCE,
    "comply": COMPLIANCE,
}
# Checked in this order: "non-refusal" must read as compliance before "refus" reads as refusal.
_COMPLIANCE_NAME = re.compile(r"\b(non|not|no)\s*refus|compli|comply|answer|accept|fulfil")
_REFUSAL_NAME = re.compile(r"refus|reject|declin")
INPUT_FORMATS = ("pair", "reply")


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def infer_label_map(id2label: Mapping[int, str]) -> dict[int, str]:
    """Label id -> `refusal` | `compliance`, read from the label names; a clear error when they do not say."""
    out: dict[int, str] = {}
    unknown = []
    for i, name in id2label.items():
        n = _norm(str(name))
        if _COMPLIANCE_NAME.search(n):
            out[int(i)] = COMPLIANCE
        elif _REFUSAL_NAME.search(n):
            out[int(i)] = REFUSAL
        else:
            unknown.append(str(name))
    if unknown:
        names = ", ".join(f"{i}={n}" for i, n in sorted(id2label.items()))
        raise RefusalEditError(
            f"cannot tell refusal from compliance for the classifier labels {', '.join(unknown)} (labels: {names}); "
            "give a label map such as 'LABEL_1=refusal,LABEL_0=compliance'"
        )
    return out


def parse_label_map(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """`"Refusal=refusal,1=refusal,LABEL_0=compliance"` (or a dict) -> {label name or id: role}."""
    if value is None:
        return {}
    items = value.items() if isinstance(value, Mapping) else (p.split("=", 1) for p in value.split(",") if p.strip())
    out: dict[str, str] = {}
    for item in items:
        if len(item) != 2:
            raise RefusalEditError(f"label map entry {'='.join(item)!r}: expected LABEL=refusal or LABEL=compliance")
        label, role = (str(x).strip() for x in item)
        if role.lower() not in _ROLES:
            raise RefusalEditError(f"label map entry {label}={role}: the role must be refusal or compliance")
        out[label] = _ROLES[role.lower()]
    return out


def resolve_label_map(id2label: Mapping[int, str], given: Mapping[str, str] | None = None) -> dict[int, str]:
    """Explicit entries (by label name or id) win; the rest is inferred from the names."""
    given = dict(given or {})
    by_name = {str(n): int(i) for i, n in id2label.items()}
    out: dict[int, str] = {}
    for label, role in given.items():
        if label in by_name:
            out[by_name[label]] = role
        elif label.isdigit() and int(label) in id2label:
            out[int(label)] = role
        else:
            known = ", ".join(f"{i}={n}" for i, n in sorted(id2label.items()))
            raise RefusalEditError(f"label {label!r} is not one of the classifier's labels ({known})")
    rest = {i: n for i, n in id2label.items() if int(i) not in out}
    if rest:
        out.update(infer_label_map(rest))
    if len(id2label) > 1 and set(out.values()) != {REFUSAL, COMPLIANCE}:
        raise RefusalEditError(
            f"the classifier label map needs at least one refusal and one compliance label, got {out}"
        )
    return dict(sorted(out.items()))


class ClassifierJudge:
    """Judge with a loaded sequence-classification model and its tokenizer.

    `input_format`: `pair` feeds (prompt, reply) as a text pair, `reply` the reply alone, and any string
    containing `{reply}` (and optionally `{prompt}`) is filled in as one text.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        label_map: Mapping[str, str] | None = None,
        input_format: str = "pair",
        threshold: float = 0.5,
        batch_size: int = 16,
        max_length: int = 512,
        name: str = "classifier",
        source: str = "",
    ) -> None:
        if input_format not in INPUT_FORMATS and "{reply}" not in input_format:
            raise RefusalEditError(f"classifier input format {input_format!r}: pair, reply, or a text with {{reply}}")
        if not 0.0 < threshold < 1.0:
            raise RefusalEditError(f"classifier threshold must be between 0 and 1, got {threshold}")
        id2label = {int(i): str(n) for i, n in (model.config.id2label or {}).items()}
        if not id2label:
            raise RefusalEditError("the classifier has no labels (config.id2label is empty)")
        self.labels = resolve_label_map(id2label, label_map)
        self.id2label = id2label
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.padding_side = "right"  # encoders take absolute positions from 0: never left-pad them
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.input_format, self.threshold = input_format, threshold
        self.batch_size, self.max_length = max(1, batch_size), max_length
        self.name, self.source = name, source

    def _encode(self, prompts: Sequence[str], replies: Sequence[str]) -> dict[str, torch.Tensor]:
        kw: dict[str, Any] = {"return_tensors": "pt", "padding": True, "truncation": True}
        kw["max_length"] = self.max_length
        if self.input_format == "pair":
            return self.tokenizer(list(prompts), list(replies), **kw)
        if self.input_format == "reply":
            return self.tokenizer(list(replies), **kw)
        texts = [self.input_format.format(prompt=p, reply=r) for p, r in zip(prompts, replies, strict=True)]
        return self.tokenizer(texts, **kw)

    @torch.inference_mode()
    def refusal_probabilities(self, prompts: Sequence[str], replies: Sequence[str]) -> list[tuple[float, int]]:
        """(p(refusal), argmax label id) per reply, in order."""
        device = model_device(self.model)
        order = sorted(range(len(replies)), key=lambda i: len(prompts[i]) + len(replies[i]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        refusal_ids = [i for i, role in self.labels.items() if role == REFUSAL]
        out: list[tuple[float, int] | None] = [None] * len(replies)
        for rows in track(batches, f"judging ({self.name})") if len(batches) > 1 else batches:
            enc = self._encode([prompts[i] for i in rows], [replies[i] for i in rows])
            logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits.double().cpu()
            if logits.shape[-1] == 1:  # one logit: sigmoid is p(label 0)
                p0 = torch.sigmoid(logits[:, 0])
                p = p0 if self.labels[0] == REFUSAL else 1 - p0
                top = torch.zeros(len(rows), dtype=torch.long)
            else:
                probs = logits.softmax(-1)
                p = probs[:, refusal_ids].sum(-1)
                top = probs.argmax(-1)
            for j, i in enumerate(rows):
                out[i] = (float(p[j]), int(top[j]))
        return out  # type: ignore[return-value]

    def judge(self, prompts: Sequence[str], replies: Sequence[str], categories: Sequence[str]) -> list[Verdict]:
        if not replies:
            return []
        return [
            Verdict(p >= self.threshold, score=p, scores={"p_refusal": p}, raw=self.id2label.get(top, str(top)))
            for p, top in self.refusal_probabilities(prompts, replies)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "type": "classifier",
            "source": self.source,
            "labels": {self.id2label[i]: role for i, role in self.labels.items()},
            "input_format": self.input_format,
            "threshold": self.threshold,
            "max_length": self.max_length,
        }
