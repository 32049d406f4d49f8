"""Text sources and the deterministic token windows drawn from them."""
