"""RunPod starts this file: `python -u src/handler.py`."""

from finetune_worker.worker import start

if __name__ == "__main__":
    start()
