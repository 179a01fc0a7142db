"""Checkpoint I/O: safetensors shards, index files, atomic output directories, model cards."""
