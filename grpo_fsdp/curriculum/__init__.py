"""SENT curriculum (semantic-entropy ordering, arXiv 2512.04359): entropy.py (answer clusters and H),
cache.py (the per-model/data file and the training order), tool.py (`python -m grpo_fsdp.curriculum`)."""
