"""What a model repository holds: the allow list of `push`, as one table.

Everything a push sends is named here (or linked from the card as an image, or added on purpose with an
include pattern); anything else in the folder stays local and is listed with the reason. A new kind of
output (an adapter, a GGUF folder) is a new row, not a new rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import PurePosixPath

from refusal_edit.checkpoint.record import RECORD

SAFETENSORS, GGUF = "safetensors", "gguf"
ANY_FORMAT = frozenset({SAFETENSORS, GGUF})


@dataclass(frozen=True)
class ModelFile:
    """Files of one kind: glob patterns on the path inside the folder (`*` stays within one folder),
    what they are, and the checkpoint formats whose repository holds them."""

    patterns: tuple[str, ...]
    what: str
    formats: frozenset[str] = ANY_FORMAT
    ignore_case: bool = False

    def matches(self, rel: str) -> bool:
        name = rel.lower() if self.ignore_case else rel
        return any(name.count("/") == p.count("/") and fnmatchcase(name, p) for p in self.patterns)


MODEL_FILES: tuple[ModelFile, ...] = (
    ModelFile(("*.safetensors",), "weights", frozenset({SAFETENSORS})),
    ModelFile(("*.safetensors.index.json",), "weights index", frozenset({SAFETENSORS})),
    ModelFile(("*.gguf",), "weights", frozenset({GGUF})),
    ModelFile(("config.json", "generation_config.json"), "model config"),
    ModelFile(
        (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "vocab.json",
            "vocab.txt",
            "merges.txt",
            "*.model",  # sentencepiece: tokenizer.model, spiece.model
            "*.tiktoken",
        ),
        "tokenizer",
    ),
    ModelFile(("chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja"), "chat template"),
    ModelFile(
        (
            "preprocessor_config.json",
            "processor_config.json",
            "video_preprocessor_config.json",
            "feature_extractor_config.json",
        ),
        "processor config",
    ),
    ModelFile(("README.md",), "model card"),
    ModelFile((RECORD,), "edit record"),
    ModelFile(("licen[cs]e*", "notice*", "copying*"), "licence", ignore_case=True),
    ModelFile(("adapter_config.json", "adapter_model.safetensors"), "PEFT adapter"),
)

NOT_A_MODEL_FILE = "not a model file (publish it on purpose with `include` PATTERN)"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img\b[^>]*?\bsrc\s*=\s*[\"']([^\"']+)", re.IGNORECASE)


def kind_of(rel: str, fmt: str = SAFETENSORS) -> str | None:
    """What `rel` (a path inside the folder) is in a model repository of format `fmt`, or None."""
    return next((f.what for f in MODEL_FILES if fmt in f.formats and f.matches(rel)), None)


def included(rel: str, patterns: tuple[str, ...]) -> bool:
    """Whether an include pattern names `rel`: a glob on the path (`*` also crosses folders), or a folder."""
    return any(fnmatchcase(rel, p) or fnmatchcase(rel, p.rstrip("/") + "/*") for p in patterns)


def card_images(card: str) -> frozenset[str]:
    """Relative paths of the images the card shows (markdown or <img>), normalised; links elsewhere are not
    files of the folder."""
    found = set()
    for match in _IMAGE_LINK.finditer(card):
        link = (match[1] or match[2]).split("#", 1)[0].split("?", 1)[0]
        if ":" in link or link.startswith(("/", "\\")) or not link.lower().endswith(IMAGE_SUFFIXES):
            continue  # a URL, an absolute path, or not an image
        parts = [p for p in PurePosixPath(link).parts if p != "."]
        if parts and ".." not in parts:
            found.add("/".join(parts))
    return frozenset(found)
