"""What clients and operators see: the job, its events and error codes, the worker's settings."""
