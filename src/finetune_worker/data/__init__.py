"""The data step: datasets downloaded and written into the run, their rows checked, the cache key, and the preflight."""
