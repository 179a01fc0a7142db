"""GGUF in, GGUF out: edit a llama.cpp model file directly, and export llama.cpp control vectors.

- `file`: a GGUF opened for editing (validated header, raw metadata entries, stored rows of tensors);
- `names` / `source`: the file as a `TensorSource` (HF names, shapes and conventions) for the edit plan;
- `quants`: dequantize / requantize every editable type (our K-quant quantizers: gguf-py has none);
- `rounding`: direction-aware rounding, so requantization does not bring the removed direction back;
- `writer` / `edit`: stream the edited GGUF out atomically, requantizing edited tensors to their own type;
- `cvec`: the direction as a llama.cpp control vector (run-time addition; it cannot ablate).
"""
