"""What a run leaves behind: the record schema, W&B tracking, plots."""
