"""Checkpoint IO: safetensors and .bin shards read tensor by tensor, sharded writing, and loading HF
models and tokenizers.
"""
