"""The progress plugin's dotted path before the package was split into subpackages:
every run's config.yaml written by release 0.1.0 names it (`plugins:`), and Axolotl
imports it from there when such a config is trained again by hand."""

from finetune_worker.run.progress_plugin import ProgressCallback, ProgressPlugin

__all__ = ["ProgressCallback", "ProgressPlugin"]
