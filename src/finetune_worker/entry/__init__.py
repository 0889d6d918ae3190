"""Entry points: RunPod's job loop, the local CLI, the client of a deployed endpoint, Pod mode."""
