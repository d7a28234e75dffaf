"""Training: the cached two-phase recipe, the full fine-tune, and the run directory they write."""
