"""RunPod starts this file: `python -u src/handler.py`."""

from finetune_worker.entry.cli import start_image

if __name__ == "__main__":
    start_image()
