"""finetune-worker: a RunPod serverless worker that fine-tunes LLMs with Axolotl."""

__version__ = "0.1.0"
