"""Build judges from what a user names: `markers`, `markers:FILE`, a classifier, an LLM judge model.

This is the only module of the package that loads models; the judges themselves take loaded objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refusal_edit.errors import RefusalEditError
from refusal_edit.judging.base import Judge, MarkerJudge
from refusal_edit.judging.classifier import ClassifierJudge, parse_label_map
from refusal_edit.judging.llm import LLMJudge
from refusal_edit.judging.markers import load_markers
from refusal_edit.loading.model import load_model

CLASSIFIER_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def _classifier_dir(spec: str) -> Path:
    """A local directory, or `hf:ORG/NAME` downloaded (safetensors only) into the Hugging Face cache."""
    if spec.startswith("hf:"):
        repo = spec[3:]
        if repo.count("/") != 1:
            raise RefusalEditError(f"classifier {spec!r}: expected hf:ORG/NAME")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(repo, allow_patterns=CLASSIFIER_FILES))
        except Exception as exc:
            raise RefusalEditError(
                f"cannot download the classifier {repo} from the Hub ({type(exc).__name__}); "
                "without network pass a local directory"
            ) from exc
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise RefusalEditError(f"judge {spec!r}: not 'markers', 'markers:FILE', hf:ORG/NAME or a local directory")
    if not (path / "config.json").is_file():
        raise RefusalEditError(f"not a model directory (no config.json): {path}")
    if not any(path.glob("*.safetensors")):
        raise RefusalEditError(f"no safetensors weights in {path} (pickle weights are never loaded)")
    return path


def load_classifier_judge(
    spec: str,
    labels: str | Mapping[str, str] | None = None,
    input_format: str = "pair",
    threshold: float = 0.5,
    batch_size: int = 16,
    device: str = "cpu",
) -> ClassifierJudge:
    """A `ClassifierJudge` from a local directory or `hf:ORG/NAME` (stock transformers, no remote code)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from refusal_edit.loading.devices import resolve_device

    path = _classifier_dir(spec)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise RefusalEditError(f"cannot load a sequence classifier from {path}: {type(exc).__name__}: {exc}") from exc
    model.to(resolve_device(device).kind)  # `auto`: the device the chat model's line named
    name = spec[3:].split("/")[-1] if spec.startswith("hf:") else path.name
    return ClassifierJudge(
        model,
        tokenizer,
        label_map=parse_label_map(labels),
        input_format=input_format,
        threshold=threshold,
        batch_size=batch_size,
        name=name,
        source=str(getattr(spec, "spec", spec)),
    )


def load_judge(spec: str, **classifier_options: Any) -> Judge:
    """`markers` (built-in list), `markers:FILE`, or a classifier (`hf:ORG/NAME` or a local directory)."""
    if spec == "markers":
        return MarkerJudge()
    if spec.startswith("markers:"):
        path = spec[len("markers:") :]
        return MarkerJudge(load_markers(path), source=path, name=f"markers:{Path(path).name}")
    return load_classifier_judge(spec, **classifier_options)


def load_llm_judge(
    spec: Any,
    mode: str = "logits",
    rubric: str = "full",
    batch_size: int = 8,
    template_kwargs: Mapping[str, Any] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    loaded: Any = None,
) -> Judge:
    """An `LLMJudge` on a chat model: `spec` is a `ModelSource` (as the workflow resolves it) or a MODEL string
    (directory, .gguf, recipe, Hub id). `loaded` (a `LoadedModel`) reuses a model already in memory, e.g. the
    base model judging its own and the edit's replies (call the judge with no hooks active).
    """
    lm = loaded if loaded is not None else load_model(spec, dtype=dtype, device=device)
    return LLMJudge(
        lm.model,
        lm.tokenizer,
        mode=mode,
        rubric=rubric,
        batch_size=batch_size,
        template_kwargs=template_kwargs,
        name=f"llm:{lm.source.name}",
        source=str(getattr(spec, "spec", spec)),
    )
