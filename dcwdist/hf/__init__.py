"""Hugging Face interop: import/export Llama and Qwen2 checkpoints."""
