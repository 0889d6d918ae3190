"""One run on the volume: its directory and lock, the child processes, the training stage and its progress, failure diagnosis, redaction."""
