"""Refusal directions: candidate generation, scoring, selection and artifacts."""
