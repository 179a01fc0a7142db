"""Model loading: directories, GGUF files (dequantized and cached), recipes and Hub ids."""

from refusal_edit.loading.model import LoadedModel, ModelSource, load_model, load_tokenizer, resolve_source

__all__ = ["LoadedModel", "ModelSource", "load_model", "load_tokenizer", "resolve_source"]
