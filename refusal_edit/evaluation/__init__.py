"""Evaluation: refusal rates, KL divergences, loss, reports."""
