"""After training: validating an adapter, merging it into the base (streaming), combining adapters."""
