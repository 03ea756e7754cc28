"""Loading a base model and its tokenizer through the quirks registry (remote code repaired at load)."""
