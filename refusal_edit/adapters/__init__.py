"""Edits written as adapters instead of new weights: a PEFT LoRA (`peft`) and a llama.cpp LoRA GGUF
(`refusal_edit.gguf.lora`), both from the plan's low-rank form (`refusal_edit.edits.lowrank`)."""
