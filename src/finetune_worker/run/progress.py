"""The training's progress: the progress plugin's records (run/progress_plugin.py) turned into events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_worker.contract.events import checkpoint, evaluation, status, warning

LONG_RUN_EVENTS = 600
ETA_MIN_STEPS = 3  # the ETA is judged only after a few steps
# What TRL's preference trainers (DPO/IPO/SimPO, KTO, ORPO) log besides the loss: the
# rewards of the chosen and rejected completions, their margin and how often the chosen
# one wins, the log-probabilities and logits, KTO's KL term, ORPO's odds ratio.
PREFERENCE_PREFIXES = ("rewards/", "logps/", "logits/")
PREFERENCE_KEYS = ("kl", "log_odds_ratio", "log_odds_chosen", "nll_loss")


def preference_metrics(logs: dict) -> dict:
    """The preference trainer's metrics in one `log` record (none for supervised training)."""
    return {
        key: _round(value) for key, value in logs.items()
        if (key.startswith(PREFERENCE_PREFIXES) or key in PREFERENCE_KEYS) and isinstance(value, (int, float))
    }


STAGE_MESSAGES = {
    "downloading": "loading the base model (downloading it unless it is cached)",
    "preprocessing": "loading and tokenizing the datasets",
    "training": "training started",
}


def _round(value: Any, digits: int = 6) -> Any:
    return round(value, digits) if isinstance(value, float) else value


@dataclass
class ProgressTracker:
    """Turns the progress plugin's records into events, throttling `progress`.

    Time comes from the records themselves (the training process's clock), so the
    same records always give the same events.
    """

    min_interval: float = 1.0
    step: int = 0
    max_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    preference: dict = field(default_factory=dict)  # the latest rewards/..., logps/... (rl runs)
    begin_time: float | None = None
    begin_step: int = 0
    now: float | None = None
    last_emit_time: float | None = None
    last_emitted: tuple | None = None
    stage: str | None = None
    nan_step: int | None = None
    saw_train_end: bool = False
    saw_saved: bool = False
    disk_quota: dict | None = None  # the plugin stopped at a checkpoint: the run directory passed FINETUNE_MAX_RUN_BYTES
    stopped_at: int | None = None  # the plugin stopped at this step's checkpoint, as the worker asked (a budget)
    wandb: dict | None = None
    metrics: dict = field(default_factory=dict)
    eta_warning_seconds: float | None = None  # warn once when the ETA is beyond this
    stage_times: dict = field(default_factory=dict)  # when the child began each stage (its clock): the measured phases
    peak_memory_per_rank: list | None = None  # several processes on GPUs: each rank's peaks
    lengths: dict | None = None  # the prepared train split's lengths (the child's `lengths` record), for the estimate
    eval_lengths: dict | None = None  # the eval split's, when the run has one
    eta_warned: bool = False
    log_due_at: int | None = None  # the step whose loss the Trainer is about to log (its `step` record said so)

    def feed(self, record: dict) -> list[dict]:
        """Update state from one record; return the events it causes at once."""
        kind = record.get("kind")
        self.now = record.get("time", self.now)
        if record.get("max_steps"):
            self.max_steps = record["max_steps"]
        if kind in ("stage", "train_begin", "train_end") and self.now is not None:
            self.stage_times.setdefault(record.get("stage") or kind, self.now)
        if kind == "stage" and record.get("stage") != self.stage:
            self.stage = record["stage"]
            return [status(self.stage, STAGE_MESSAGES.get(self.stage, self.stage))]
        if kind == "train_begin":
            self.begin_time, self.begin_step = self.now, record.get("step", 0)
            self.step = self.begin_step
            self.stage = "training"
            resumed = f" from step {self.begin_step}" if self.begin_step else ""
            return [status("training", f"training {self.max_steps} steps{resumed}", total_steps=self.max_steps)]
        if kind == "step":
            self.step = record["step"]
            self.epoch = record.get("epoch", self.epoch)
            self.log_due_at = self.step if record.get("log_follows") else None
        elif kind == "log":
            self._absorb_logs(record)
            if any(k.startswith("eval_") for k in record.get("logs", {})):
                return []  # eval metrics arrive as their own record
            if record.get("step") == self.log_due_at:
                self.log_due_at = None
        elif kind == "checkpoint":
            return [checkpoint(record["step"], record["path"])]
        elif kind == "eval":
            metrics = {k.removeprefix("eval_"): _round(v) for k, v in record.get("metrics", {}).items()}
            self.metrics.update({f"eval_{k}": v for k, v in metrics.items()})
            return [evaluation(record.get("step"), metrics)]
        elif kind == "nan_loss":
            self.nan_step = record.get("step")
        elif kind == "disk_quota":
            self.disk_quota = record
        elif kind == "downloaded" and isinstance(record.get("at"), (int, float)):
            self.stage_times.setdefault("downloaded", record["at"])
        elif kind == "lengths":
            self.lengths = record.get("train") if isinstance(record.get("train"), dict) else None
            self.eval_lengths = record.get("eval") if isinstance(record.get("eval"), dict) else None
        elif kind == "stopped_at_checkpoint":
            self.stopped_at = record.get("step")
        elif kind == "wandb":
            self.wandb = {k: record.get(k) for k in ("url", "project", "name", "run_id", "dir")}
            where = record.get("url") or f"offline, in {record.get('dir')}"
            return [status("training", f"W&B run: {where}", wandb_url=record.get("url"))]
        elif kind == "train_end":
            self.saw_train_end = True
            for name in ("peak_memory_reserved", "peak_memory_allocated"):
                peak = record.get(name)
                if isinstance(peak, int) and not isinstance(peak, bool):  # on a GPU only
                    self.metrics[name] = peak
            ranks = record.get("peak_memory_per_rank")
            if isinstance(ranks, list) and all(isinstance(rank, dict) for rank in ranks):
                self.peak_memory_per_rank = ranks
        elif kind == "saved":
            self.saw_saved = True
        return []

    def _absorb_logs(self, record: dict) -> None:
        logs = record.get("logs", {})
        self.step = max(self.step, record.get("step") or 0)
        self.epoch = logs.get("epoch", self.epoch)
        if isinstance(logs.get("loss"), (int, float)):
            self.loss = logs["loss"]
            self.metrics.setdefault("first_loss", _round(self.loss))
            self.metrics["final_loss"] = _round(self.loss)
        if isinstance(logs.get("learning_rate"), (int, float)):
            self.learning_rate = logs["learning_rate"]
        found = preference_metrics(logs)
        if found:
            self.preference = found
            self.metrics.update({f"final_{key}": value for key, value in found.items()})
        for key in ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "num_input_tokens_seen",
                    "train_tokens_per_second"):
            if key in logs:
                self.metrics[key] = _round(logs[key])

    def progress_due(self, force: bool = False) -> dict | None:
        """A `progress` event if one is due: about one a second, and always the last step."""
        if self.begin_time is None or self.step <= self.begin_step:
            return None
        if self.log_due_at is not None and not force:
            return None  # the step's loss is on its way (the worker read between the step and its log)
        state = (self.step, self.loss, tuple(self.preference.items()))
        if state == self.last_emitted:
            return None
        finished = self.max_steps is not None and self.step >= self.max_steps
        waited = self.last_emit_time is None or (self.now or 0) - self.last_emit_time >= self._interval()
        if not (force or finished or waited):
            return None
        self.last_emitted, self.last_emit_time = state, self.now
        return self.progress_event()

    def eta_warning(self) -> dict | None:
        """A `warning`, once, when the ETA is far beyond reasonable (`eta_warning_seconds`)."""
        eta = self._eta()
        if self.eta_warned or self.eta_warning_seconds is None or eta is None or eta <= self.eta_warning_seconds:
            return None
        if self.step - self.begin_step < ETA_MIN_STEPS:
            return None
        self.eta_warned = True
        return warning(
            f"at this pace the training needs about {eta / 3600:.1f} more hours ({self.max_steps - self.step} steps left), "
            f"beyond {self.eta_warning_seconds / 3600:g} h; consider fewer steps (num_epochs, max_steps) or a faster worker"
        )

    def _interval(self) -> float:
        """About one a second, then slower for long runs, so a run of any length
        streams a bounded number of progress events (~N + N*ln(T/N), N=600)."""
        elapsed = (self.now or 0) - (self.begin_time or 0)
        return max(self.min_interval, elapsed / LONG_RUN_EVENTS)

    def progress_event(self) -> dict:
        total = self.max_steps or 0
        percent = round(100.0 * self.step / total, 1) if total else None
        event = {
            "type": "progress",
            "step": self.step,
            "total_steps": self.max_steps,
            "epoch": _round(self.epoch, 4),
            "loss": _round(self.loss),
            "learning_rate": _round(self.learning_rate, 10),
            "percent": percent,
            "eta_seconds": self._eta(),
        }
        if self.preference:
            event["preference"] = dict(self.preference)
        return event

    def phases(self) -> dict[str, float]:
        """Seconds of the training child's phases, as far as they ran: tokenizing the datasets,
        downloading the base model (when it was not cached), loading it, training."""
        times, found = self.stage_times, {}
        loaded_from = "downloaded" if "downloaded" in times else "downloading"
        for name, begin, end in (("tokenize", "preprocessing", "downloading"), ("download", "downloading", "downloaded"),
                                 ("load", loaded_from, "train_begin"), ("train", "train_begin", "train_end")):
            if begin in times and end in times and times[end] >= times[begin]:
                found[name] = round(times[end] - times[begin], 2)
        return found

    def eta(self) -> float | None:
        """Seconds of training left at the pace so far, once a few steps have run."""
        return self._eta() if self.step - self.begin_step >= ETA_MIN_STEPS else None

    def _eta(self) -> float | None:
        done = self.step - self.begin_step
        if not self.max_steps or done <= 0 or self.now is None or self.begin_time is None:
            return None
        per_step = (self.now - self.begin_time) / done
        return round(max(0.0, per_step * (self.max_steps - self.step)), 1)
