"""`finetune-worker`: run a job on this machine (and, later, talk to an endpoint)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

BAR_WIDTH = 30


def load_job_file(path: Path) -> Any:
    """A job file holds `{"input": {...}}` like test_input.json, or the input itself."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["input"] if isinstance(data, dict) and "input" in data else data


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m" if minutes else f"{seconds:.0f}s"


def _choice(row: dict | None) -> str:
    if row is None:
        return "none"
    cost = f"${row['cost_usd']:.2f}" if row.get("cost_usd") is not None else "no price"
    return f"{row['gpu']} x{row['count']} {cost} ({_duration(row['total_seconds'])})"


def format_estimate(estimate: dict) -> str:
    """The estimate as a table: one line per GPU type and count, then the cheapest and the fastest."""
    if not estimate.get("rows"):
        return f"estimate: {estimate.get('reason', 'none')}"
    lines = [f"estimate: {estimate['train_tokens']:,} training tokens ({estimate['epochs']:g} epochs), "
             f"{estimate['method']} on a {estimate['active_params'] / 1e9:.2f} B model",
             f"{'gpu':26} {'n':>2}  {'fits':4}  {'memory':>9}  {'train':>8}  {'total':>8}  {'cost':>8}  from"]
    for row in estimate["rows"]:
        cost = f"${row['cost_usd']:.2f}" if row.get("cost_usd") is not None else "-"
        note = row.get("reason") or row.get("from", "")
        lines.append(f"{row['gpu']:26} {row['count']:>2}  {'yes' if row['fits'] else 'no':4}  {row['memory_gib']:>5.1f} GiB  "
                     f"{_duration(row['train_seconds']):>8}  {_duration(row['total_seconds']):>8}  {cost:>8}  {note}")
    lines.append(f"cheapest: {_choice(estimate.get('cheapest'))}; fastest: {_choice(estimate.get('fastest'))}")
    lines += [f"  {source}" for source in estimate.get("sources", []) if source.startswith(("prices", "known error"))]
    return "\n".join(lines)


class HumanPrinter:
    """Live, readable output: a redrawn progress bar on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO):
        self.out = out
        self.live = out.isatty()
        self.bar_drawn = False

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "progress":
            self._progress(event)
            return
        self._end_bar()
        if kind == "status":
            self._line(f"[{event['stage']}] {event['message']}")
            if "example" in event:
                self._line("  | " + event["example"]["text"].replace("\n", "\n  | "))
        elif kind == "warning":
            self._line(f"warning: {event['message']}")
        elif kind == "checkpoint":
            self._line(f"checkpoint saved at step {event['step']}: {event['path']}")
        elif kind == "eval" and "base" in event:
            self._line(f"evaluation on {event['examples']} examples (base model -> fine-tuned):")
            for key, delta in event["delta"].items():
                self._line(f"  {key:12} {event['base'][key]:>9} -> {event['finetuned'][key]:<9} ({delta:+})")
        elif kind == "eval":
            metrics = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("type", "step"))
            self._line(f"eval at step {event.get('step')}: {metrics}")
        elif kind == "generation":
            prompt = event["prompt"] if isinstance(event["prompt"], str) else event["prompt"][-1]["content"]
            self._line(f"[{event['index']}] {prompt}\n  -> {event['completion']}")
        elif kind == "result" and event.get("mode") == "generate":
            self._line(f"generated {len(event['completions'])} answers with run {event['run_id']} ({event['checkpoint']}); "
                       f"serve it: {event['deploy']['vllm_serve']}")
        elif kind == "result" and event.get("mode") in ("runs", "events"):
            self._line(json.dumps(event, indent=2))  # a read-back answer: the finetune-worker runs/events commands format it
        elif kind == "result":
            done = f"{event['mode']} completed" if event.get("mode") in ("preflight", "estimate") else "completed"
            if event.get("estimate"):
                self._line(format_estimate(event["estimate"]))
            self._line(f"{done} in {event.get('duration_seconds')}s: {event.get('output_dir')}")
            if event.get("not_published_reason"):
                self._line(event["not_published_reason"])
            self._line(json.dumps(event.get("metrics"), indent=2))
        elif kind == "error":
            if event.get("estimate"):
                self._line(format_estimate(event["estimate"]))
            self._line(f"error [{event['code']}]: {event['message']}")
            for detail in event.get("details") or []:
                self._line(f"  - {detail}")
            if event.get("log_tail"):
                self._line("last lines of the training log:")
                for line in event["log_tail"]:
                    self._line(f"  | {line}")

    def _progress(self, event: dict) -> None:
        percent = event.get("percent") or 0.0
        filled = int(BAR_WIDTH * percent / 100)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        loss = f"{event['loss']:.4f}" if isinstance(event.get("loss"), (int, float)) else "-"
        eta = f"{event['eta_seconds']:.0f}s" if event.get("eta_seconds") is not None else "-"
        text = f"[{bar}] {percent:5.1f}% step {event['step']}/{event['total_steps']} loss {loss} eta {eta}"
        if self.live:
            self.out.write("\r" + text)
            self.out.flush()
            self.bar_drawn = True
        else:
            self._line(text)

    def _end_bar(self) -> None:
        if self.bar_drawn:
            self.out.write("\n")
            self.bar_drawn = False

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def print_json(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


EXIT_SIGTERM = 128 + 15


async def _run(job_input: Any, emit, launch: str = "machine") -> int:
    """Run the job, printing every event. SIGTERM stops the job (its training too) and
    prints its final `cancelled` event before the command exits with 143."""
    import signal

    from finetune_worker.contract import errors, events
    from finetune_worker.contract.errors import JobError
    from finetune_worker.entry.worker import make_handler
    from finetune_worker.host.children import request_shutdown

    last: dict | None = None

    async def consume() -> None:
        nonlocal last
        async for event in make_handler(chain_sigterm=False, launch=launch)({"id": "local", "input": job_input}):
            emit(event)
            last = event

    job = asyncio.ensure_future(consume())
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        request_shutdown()  # stops the training tree; its job ends cancelled
        job.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        await job
    except asyncio.CancelledError:
        if not terminated:
            raise
    except Exception as exc:  # never a traceback: the client reads a final error event
        emit(events.error(JobError(errors.INTERNAL_ERROR, f"finetune-worker run hit an unexpected {type(exc).__name__}")))
        return 1
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
    if terminated:
        if not (last and last["type"] in ("result", "error")):
            emit(events.error(JobError(errors.CANCELLED, "finetune-worker run got SIGTERM and stopped the job; run the same job again to resume it")))
        return EXIT_SIGTERM
    return 0 if last and last["type"] == "result" else 1


def start_image() -> None:
    """The image's entry: the RunPod job loop on RunPod (or serving the SDK's local API);
    elsewhere a Pod (RUNPOD_POD_ID or FINETUNE_MODE=pod), else the job in test_input.json:
    RunPod's local test mode never iterates a generator handler, so the CLI runs it."""
    from finetune_worker.entry import worker

    if worker.on_runpod() or worker.serving_local_api():
        worker.start()
        return
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    if os.environ.get("RUNPOD_POD_ID") or os.environ.get("FINETUNE_MODE") == "pod":
        sys.exit(main(["pod"]))
    sys.exit(main(["run", "test_input.json"]))


def cmd_run(args: argparse.Namespace) -> int:
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    emit = print_json if args.json else HumanPrinter(sys.stdout)
    try:
        job_input = load_job_file(Path(args.job))
    except RecursionError:
        from finetune_worker.contract import errors, events
        from finetune_worker.contract.errors import JobError
        from finetune_worker.contract.job import MAX_NESTING_DEPTH

        message = f"{args.job}: lists and objects are nested more than {MAX_NESTING_DEPTH} levels deep; no job needs that many"
        emit(events.error(JobError(errors.INVALID_INPUT, message)))
        return 2
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.job}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_run(job_input, emit, launch="cluster" if args.command == "cluster" else "machine"))


def _credentials_from_env(wanted: bool) -> dict[str, str]:
    if not wanted:
        return {}
    names = {"hf_token": "HF_TOKEN", "wandb_api_key": "WANDB_API_KEY"}
    return {key: os.environ[name] for key, name in names.items() if os.environ.get(name)}


def _follow(endpoint, job_id: str, args: argparse.Namespace) -> int:
    from finetune_worker.entry import client

    emit = print_json if args.json else HumanPrinter(sys.stdout)
    try:
        final = client.follow(endpoint, job_id, emit, poll_seconds=args.poll)
    except KeyboardInterrupt:
        if getattr(args, "cancel", False):
            client.cancel(endpoint, job_id)
            print(f"\ncancelled job {job_id}", file=sys.stderr)
        else:
            print(f"\ndetached; the job goes on. Re-attach: finetune-worker status {job_id} --endpoint {args.endpoint}", file=sys.stderr)
        return 130
    return 0 if final.get("type") == "result" else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from finetune_worker.entry import client

    if args.webhook and (problem := client.webhook_problem(args.webhook)):
        print(f"finetune-worker submit: {problem}", file=sys.stderr)
        return 2
    job = client.job_from_config(
        Path(args.config),
        user_id=args.user_id,
        model_id=args.model_id,
        run_id=args.run_id,
        credentials=_credentials_from_env(args.credentials_from_env),
    )
    endpoint = client.connect(args.endpoint, os.environ)
    job_id = client.submit(endpoint, job, args.execution_timeout, webhook=args.webhook)
    print(f"submitted job {job_id} (run {job.get('user_id')}/{job.get('run_id')}) to endpoint {args.endpoint}", file=sys.stderr)
    return _follow(endpoint, job_id, args)


def cmd_estimate(args: argparse.Namespace) -> int:
    """The time and cost table: on an endpoint (--endpoint), or on this machine like `run`."""
    from finetune_worker.entry import client

    job = client.estimate_job(Path(args.config), user_id=args.user_id, model_id=args.model_id, run_id=args.run_id,
                              credentials=_credentials_from_env(args.credentials_from_env))
    if not args.endpoint:
        emit = print_json if args.json else HumanPrinter(sys.stdout)
        return asyncio.run(_run(job, emit))
    endpoint = client.connect(args.endpoint, os.environ)
    job_id = client.submit(endpoint, job)
    print(f"submitted estimate {job_id} (run {job.get('user_id')}/{job.get('run_id')}) to endpoint {args.endpoint}", file=sys.stderr)
    return _follow(endpoint, job_id, args)


def cmd_status(args: argparse.Namespace) -> int:
    from finetune_worker.entry import client

    endpoint = client.connect(args.endpoint, os.environ)
    return _follow(endpoint, args.job_id, args)


def _ask(mode: str, args: argparse.Namespace, **fields) -> dict:
    from finetune_worker.entry import client

    endpoint = client.connect(args.endpoint, os.environ)
    fields = {"limit": args.limit, "offset": args.offset, **fields}
    job = client.history_job(mode, args.user_id, user_token=os.environ.get("FINETUNE_USER_TOKEN"), **fields)
    return client.ask(endpoint, job, poll_seconds=args.poll)


def _print_error(event: dict) -> int:
    print(f"error [{event.get('code')}]: {event.get('message')}", file=sys.stderr)
    for detail in event.get("details") or []:
        print(f"  - {detail}", file=sys.stderr)
    return 1


RUN_COLUMNS = ("run_id", "state", "created", "method", "base_model", "steps", "final_loss", "hub_url")


def cmd_runs(args: argparse.Namespace) -> int:
    answer = _ask("runs", args)
    if answer.get("type") != "result":
        return _print_error(answer)
    if args.json:
        print_json(answer)
        return 0
    rows = [[str(run.get(key) if run.get(key) is not None else "-") for key in RUN_COLUMNS] for run in answer["runs"]]
    widths = [max([len(key)] + [len(row[i]) for row in rows]) for i, key in enumerate(RUN_COLUMNS)]
    for row in [list(RUN_COLUMNS), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    shown = f"{answer['offset'] + 1}-{answer['offset'] + len(answer['runs'])}" if answer["runs"] else "none"
    more = f"; next page: --offset {answer['next_offset']}" if answer.get("next_offset") is not None else ""
    print(f"runs {shown} of {answer['total']} for {answer['user_id']}{more}", file=sys.stderr)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """Every recorded event of a run from --offset on, page after page (or one page: --limit)."""
    emit = print_json if args.json else HumanPrinter(sys.stdout)
    offset = args.offset
    while True:
        answer = _ask("events", args, run_id=args.run_id, offset=offset)
        if answer.get("type") != "result":
            return _print_error(answer)
        for event in answer["events"]:
            emit(event)
        offset = answer["next_offset"]
        if not answer.get("more") or args.limit is not None:
            break
    print(f"run {args.run_id} is {answer['state']}; {offset} events read (continue with --offset {offset})", file=sys.stderr)
    return 0


def cmd_configure(args: argparse.Namespace) -> int:
    import yaml

    from finetune_worker.entry.pod import configure_from_env
    from finetune_worker.host.hardware import detect_hardware
    from finetune_worker.host.rundir import write_config

    template = yaml.safe_load(Path(args.template).read_text(encoding="utf-8")) if args.template else None
    config, problems = configure_from_env(os.environ, detect_hardware(), Path.cwd(), template)
    if problems:
        print(f"{len(problems)} problem(s) in the AXOLOTL_* variables:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    write_config(Path(args.output), config)
    print(f"wrote {args.output} ({len(config)} options); train it with: axolotl train {args.output}")
    return 0


def cmd_pod(args: argparse.Namespace) -> int:
    from finetune_worker.entry.pod import start_pod

    return start_pod(os.environ)


def cmd_serve(args: argparse.Namespace) -> int:
    from finetune_worker.contract.settings import SettingsInvalid, WorkerSettings
    from finetune_worker.serve.server import serve

    try:
        runs_dir = WorkerSettings.from_env(os.environ).runs_dir
    except SettingsInvalid as exc:
        print(f"finetune-worker serve: {exc}", file=sys.stderr)
        return 2
    checkpoint = "final" if args.checkpoint == "final" else int(args.checkpoint)
    return serve(args.run, runs_dir=runs_dir, env=os.environ, host=args.host, port=args.port, checkpoint=checkpoint, server=args.server)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-worker", description="Fine-tune LLMs with Axolotl, locally or on RunPod.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a job file (like test_input.json) on this machine")
    run.add_argument("job", help="JSON file: {\"input\": {...}} or the input object itself")
    run.add_argument("--json", action="store_true", help="print one JSON event per line, nothing else")
    run.set_defaults(func=cmd_run)

    cluster = commands.add_parser("cluster", help="run a job file as one node of a multi-node cluster: the same command on every node "
                                  "(RunPod Instant Clusters, dstack, SkyPilot or NNODES/NODE_RANK/MASTER_ADDR variables)")
    cluster.add_argument("job", help="JSON file: {\"input\": {...}} or the input object itself; the same on every node")
    cluster.add_argument("--json", action="store_true", help="print one JSON event per line, nothing else")
    cluster.set_defaults(func=cmd_run)

    submit = commands.add_parser("submit", help="submit a job to a RunPod endpoint and follow it (RUNPOD_API_KEY)")
    submit.add_argument("config", help="an Axolotl YAML (becomes args) or a job JSON")
    submit.add_argument("--endpoint", required=True, help="the endpoint id")
    submit.add_argument("--user-id", help="default: the job's, or 'me'")
    submit.add_argument("--model-id", help="default: the job's, or the YAML file name")
    submit.add_argument("--run-id", help="default: the job's, or the current time")
    submit.add_argument("--credentials-from-env", action="store_true", help="send HF_TOKEN and WANDB_API_KEY from this shell as the job's credentials")
    submit.add_argument("--execution-timeout", type=int, metavar="SECONDS", help="RunPod executionTimeout for this job")
    submit.add_argument("--cancel", action="store_true", help="cancel the job on Ctrl-C (default: detach and let it run)")
    submit.add_argument("--webhook", metavar="URL", help="an https:// URL: RunPod POSTs the job's final status to it when the job ends (RunPod's `webhook` field)")
    submit.set_defaults(func=cmd_submit)

    estimate = commands.add_parser("estimate", help="time and cost of a job on each GPU type and count, without training (mode: estimate)")
    estimate.add_argument("config", help="an Axolotl YAML (becomes args) or a job JSON")
    estimate.add_argument("--endpoint", help="ask this endpoint (RUNPOD_API_KEY); default: estimate on this machine")
    estimate.add_argument("--user-id", help="default: the job's, or 'me'")
    estimate.add_argument("--model-id", help="default: the job's, or the YAML file name")
    estimate.add_argument("--run-id", help="default: the job's, or the current time")
    estimate.add_argument("--credentials-from-env", action="store_true", help="send HF_TOKEN from this shell (a gated base model's config)")
    estimate.set_defaults(func=cmd_estimate)

    status = commands.add_parser("status", help="re-attach to a job on an endpoint and follow it to the end")
    status.add_argument("job_id")
    status.add_argument("--endpoint", required=True, help="the endpoint id")
    status.add_argument("--cancel", action="store_true", help="cancel the job on Ctrl-C")
    status.set_defaults(func=cmd_status)

    runs = commands.add_parser("runs", help="list a user's runs on an endpoint's volume, newest first (mode: runs)")
    runs.add_argument("--limit", type=int, help="runs per page (default 50, at most 200)")
    runs.set_defaults(func=cmd_runs)
    events_cmd = commands.add_parser("events", help="print a run's recorded events, days after it ended (mode: events)")
    events_cmd.add_argument("run_id")
    events_cmd.add_argument("--limit", type=int, help="one page of at most this many events (default: every page)")
    events_cmd.set_defaults(func=cmd_events)
    for command in (runs, events_cmd):
        command.add_argument("--endpoint", required=True, help="the endpoint id")
        command.add_argument("--user-id", default="me", help="whose runs (default 'me'); FINETUNE_USER_TOKEN is sent as its user_token")
        command.add_argument("--offset", type=int, help="runs: how many of the newest to skip; events: the first event's index")

    configure = commands.add_parser("configure", help="write an Axolotl YAML from AXOLOTL_* variables, validated like a job")
    configure.add_argument("--from-env", action="store_true", required=True, help="read AXOLOTL_* variables (the only source for now)")
    configure.add_argument("--output", required=True, help="where to write the YAML")
    configure.add_argument("--template", help="a YAML of defaults that AXOLOTL_* variables override")
    configure.set_defaults(func=cmd_configure)

    pod = commands.add_parser("pod", help="Pod start-up: configure from AXOLOTL_*, log in to the Hub, print what to do next")
    pod.set_defaults(func=cmd_pod)

    serve = commands.add_parser(
        "serve", help="serve a finished run with an OpenAI-compatible server (vLLM, else transformers serve)",
        epilog="An API key: set FINETUNE_SERVE_API_KEY in the environment (never on the command line); vLLM then answers "
        "/v1/* only with 'Authorization: Bearer <key>'. transformers serve cannot check a key, so with one set it is refused.",
    )
    serve.add_argument("run", help="a run directory (with config.yaml: a worker run or a Pod's directory), or USER/RUN_ID on the volume")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (0.0.0.0 to expose it through the Pod's HTTP port)")
    serve.add_argument("--checkpoint", default="final", help="final (default) or a step number (vLLM only for a LoRA)")
    serve.add_argument("--server", choices=("auto", "vllm", "transformers"), default="auto", help="default: vllm where installed")
    serve.set_defaults(func=cmd_serve)

    for command in (submit, estimate, status, runs, events_cmd):
        command.add_argument("--json", action="store_true", help="print one JSON event per line, nothing else")
        command.add_argument("--poll", type=float, default=1.0, help="seconds between polls (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry() -> None:
    """The `finetune-worker` command. It ends without the interpreter's teardown:
    after validating with Axolotl's schema this process holds torch and transformers,
    and freeing their modules one by one takes about 2 s of nothing. The children
    (training, Hub) have ended by now, and no atexit work is left but logging."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
