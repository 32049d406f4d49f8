"""Benchmarks: perplexity, lm-eval zero-shot tasks, the offline task suite."""
