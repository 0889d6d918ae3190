"""The time and cost table of a job, from its preflight report: `mode: estimate`, the
preflight's `estimate`, and the budget check before a training.

The arithmetic is in sizing/ (`estimate.py`, `throughput.py`); this module gathers its
inputs: the preflight's token counts, the base model's facts, the publish options, the
operator's prices and GPU types.
"""

from __future__ import annotations

from finetune_worker.contract.job import LORA_ADAPTERS, JobInput
from finetune_worker.contract.settings import WorkerSettings
from finetune_worker.sizing import gpus
from finetune_worker.sizing.estimate import Request, estimate_table
from finetune_worker.sizing.measured import STORE_NAME, learned
from finetune_worker.sizing.resources import ModelFacts, estimate_disk, lora_params, planned_saves
from finetune_worker.sizing.throughput import Evaluation, Fixed, Lengths, Rates, method_of

MB = 1e6


def lengths_from_report(report: dict, split: str = "train") -> Lengths | None:
    """A prepared split's lengths (`train` or `eval`) from the preflight report (None: no such
    split, a preference dataset, or a report from before the estimate existed)."""
    found = report.get(split)
    if not found:
        return None
    return Lengths(rows=found["rows"], tokens=found["tokens"], sum_squares=found["sum_squares"],
                   histogram=tuple(found["histogram"]), packed_bins=(found.get("if_packed") or {}).get("bins") or None)


def job_evaluation(config: dict, job: JobInput, report: dict) -> Evaluation:
    """The evaluations the job runs: Axolotl's over the eval split, and the job's `evaluation`."""
    options = job.evaluation
    return Evaluation(lengths=lengths_from_report(report, "eval"), examples=options.num_examples if options else 0,
                      new_tokens=options.max_new_tokens if options else 0, full_model=method_of(config) == "full")


def fixed_costs(config: dict, job: JobInput, base: ModelFacts, tokenize_seconds: float) -> Fixed:
    disk = estimate_disk(config, base, merge=job.publish.merge_lora)
    pushes = bool(config.get("hub_model_id") or job.publish.merged_hub_model_id)
    adapter = config.get("adapter") in LORA_ADAPTERS
    final = disk.final if disk else (lora_params(config, base.config, base.params or 0) * 4 if adapter else base.weight_bytes or 0)
    push = (final + (disk.merged if disk else 0)) if pushes else 0
    return Fixed(weight_bytes=base.weight_bytes or 0, needs_download=base.needs_download, checkpoint_bytes=disk.checkpoint if disk else 0,
                 saves=planned_saves(config) or 1, push_bytes=push, merge=job.publish.merge_lora,
                 tokenize_seconds=round(tokenize_seconds, 1), params=base.params or 0)


def job_estimate(config: dict, job: JobInput, base: ModelFacts, report: dict, settings: WorkerSettings,
                 tokenize_seconds: float, publish: dict | None = None) -> dict:
    """The table for `config` (planned for a GPU, before any GPU's fast defaults); a
    `reason` instead of rows when the inputs are missing."""
    lengths = lengths_from_report(report)
    if base.config is None or "hidden_size" not in base.config:
        return {"rows": [], "cheapest": None, "fastest": None, "reason": "no estimate: the base model's config.json could not be read"}
    if lengths is None:
        return {"rows": [], "cheapest": None, "fastest": None,
                "reason": "no estimate: preference (rl) datasets are not estimated yet" if report.get("rl") else "no estimate: no token counts"}
    counts = (job.num_processes,) if job.num_processes else gpus.COUNTS
    request = Request(
        config=config, model_config=base.config, lengths=lengths,
        fixed=fixed_costs({**config, **(publish or {})}, job, base, tokenize_seconds), evaluation=job_evaluation(config, job, report),
        gpus=gpus.selected(settings.gpu_types), prices=gpus.prices(settings.gpu_prices), price_overrides=dict(settings.gpu_prices),
        rates=Rates(download=settings.download_mbps * MB, volume=settings.volume_mbps * MB, upload=settings.upload_mbps * MB),
        counts=counts, learned=learned(settings.cache_dir / STORE_NAME, base.config.get("model_type"), method_of(config)),
    )
    return estimate_table(request)
