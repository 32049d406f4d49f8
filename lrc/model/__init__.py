"""The model: loading, the adapter table of model families, LowRankLinear, checkpoints, where blocks live."""
