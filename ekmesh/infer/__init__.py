"""Inference: model code, expert compute, tokenizer, generation. Reaches peers only through injected backends."""
