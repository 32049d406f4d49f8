"""The compression stage: one decomposition -> allocation -> factorization path, plan scoring and swapping."""
