"""Recovery fine-tuning of a compressed model (config group ``finetune``)."""
