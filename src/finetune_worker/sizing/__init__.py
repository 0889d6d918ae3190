"""Will the run fit, and on what: the base model's facts, GPU memory and disk estimates, and what the GPU offers for speed."""
