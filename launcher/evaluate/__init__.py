"""Batch evaluation: the plan, its shards, generation (HF or vLLM), benchmarks, scores and the report."""
