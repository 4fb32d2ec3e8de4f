"""Evaluation through lm-evaluation-harness: the HF and vLLM backends and task identities for job keys."""
