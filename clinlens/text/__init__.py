"""Text side: tokenizer, prompt templates, negation."""
