"""Training and evaluation examples: row formats, prompt templates, tokenization, the tokenized cache."""
