"""A loopback stand-in for RunPod's serverless queue, speaking both of its protocols.

Worker side, as runpod-python 1.10 calls it (runpod/serverless/modules/rp_job.py,
rp_http.py, rp_ping.py, rp_scale.py):
  GET  /v2/{ep}/job-take/{worker}?...&job_in_progress=0|1  -> 200 {"id","input"} | 204
  GET  /v2/{ep}/job-stop/{worker}?...                      -> 200 {"jobsToStop": [...]} | 204 (long poll)
  POST /v2/{ep}/job-done/{worker}/{job}?...&isStream=...   <- {"output": ...} | {"error": ...}
                                                             | {"status": "IN_PROGRESS", "output": ...}
  POST /v2/{ep}/job-stream/{worker}/{job}?...              <- {"output": chunk}
  GET  /v2/{ep}/ping/{worker}?job_id=...
The worker authenticates with the raw RUNPOD_AI_API_KEY in `Authorization`.

Client side (runpod/endpoint/runner.py), with `Authorization: Bearer <key>`:
  POST /v2/{ep}/run {"input": ..., "webhook"?: url} -> {"id", "status": "IN_QUEUE"}
                                     (at the end, the final /status body is POSTed to the webhook)
  GET|POST /v2/{ep}/status/{id}      -> {"id", "status", "output"?, "error"?, ...}
  GET|POST /v2/{ep}/stream/{id}      -> {"id", "status", "stream": [{"output": chunk}, ...]} (new chunks only)
  POST /v2/{ep}/cancel/{id}          -> {"id", "status": "CANCELLED"}
An execution timeout ends a running job TIMED_OUT and signals the worker the same
way as a cancel.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
LONG_POLL_SECONDS = 1.0


@dataclass
class FakeJob:
    id: str
    input: Any
    execution_timeout: float | None = None
    status: str = "IN_QUEUE"
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    progress: Any = None
    output: Any = None
    error: Any = None
    stream: list = field(default_factory=list)
    stream_cursor: int = 0
    status_history: list = field(default_factory=list)
    webhook: str | None = None


class FakeRunPod:
    def __init__(self, endpoint_id: str = "ep-test", worker_key: str = "worker-key", client_key: str = "client-key"):
        self.endpoint_id = endpoint_id
        self.worker_key = worker_key
        self.client_key = client_key
        self.jobs: dict[str, FakeJob] = {}
        self.queue: list[str] = []
        self.stop_signals: list[str] = []
        self.pings = 0
        self.worker_posts: list[bytes] = []  # bodies of job-done and job-stream, for leak checks
        self.client_replies: list[bytes] = []  # replies to /status, /stream and /cancel
        self.webhook_calls: list[tuple[str, int | str]] = []  # (job id, the webhook's HTTP status or the failure)
        self.webhook_tls = None  # an ssl.SSLContext that trusts the test's https webhook
        self.lock = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self._threads = [
            threading.Thread(target=self.server.serve_forever, daemon=True),
            threading.Thread(target=self._watch_timeouts, daemon=True),
        ]
        self._closed = False

    # ------------------------------------------------------------------ setup
    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeRunPod:
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self.server.shutdown()
        self.server.server_close()

    def worker_env(self, worker_id: str = "worker-1") -> dict[str, str]:
        v2 = f"{self.base}/v2/{self.endpoint_id}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{v2}/job-take/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{v2}/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{v2}/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_PING": f"{v2}/ping/$RUNPOD_POD_ID?gpu=cpu",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_POD_HOSTNAME": f"{worker_id}-host",
            "RUNPOD_AI_API_KEY": self.worker_key,
            "RUNPOD_ENDPOINT_ID": self.endpoint_id,
            "RUNPOD_PING_INTERVAL": "2000",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    def client_env(self) -> dict[str, str]:
        return {"RUNPOD_ENDPOINT_BASE_URL": f"{self.base}/v2", "RUNPOD_API_KEY": self.client_key}

    def submit(self, job_input: Any, execution_timeout: float | None = None) -> str:
        """Queue a job directly (tests that do not go through the client)."""
        with self.lock:
            job = FakeJob(id=f"job-{uuid.uuid4().hex[:10]}", input=job_input, execution_timeout=execution_timeout)
            self.jobs[job.id] = job
            self.queue.append(job.id)
            self.lock.notify_all()
            return job.id

    def wait_for(self, job_id: str, predicate, timeout: float) -> FakeJob:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate(self.jobs[job_id]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{job_id}: still {self.jobs[job_id].status}")
                self.lock.wait(remaining)
            return self.jobs[job_id]

    # -------------------------------------------------------------- protocol
    def _set_status(self, job: FakeJob, status: str) -> None:
        job.status = status
        job.status_history.append(status)
        if status in FINAL:
            job.finished = time.monotonic()
            if job.webhook:
                threading.Thread(target=self._call_webhook, args=(job.id, job.webhook), daemon=True).start()
        self.lock.notify_all()

    def _call_webhook(self, job_id: str, url: str) -> None:
        """RunPod POSTs the job's final /status body to the job's webhook."""
        import urllib.request

        body = json.dumps(self._status(job_id)).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.webhook_tls) as reply:
                outcome: int | str = reply.status
        except OSError as exc:
            outcome = str(exc)
        with self.lock:
            self.webhook_calls.append((job_id, outcome))
            self.lock.notify_all()

    def _watch_timeouts(self) -> None:
        while not self._closed:
            with self.lock:
                now = time.monotonic()
                for job in self.jobs.values():
                    if job.status == "IN_PROGRESS" and job.execution_timeout and now - job.started > job.execution_timeout:
                        self._set_status(job, "TIMED_OUT")
                        self.stop_signals.append(job.id)
            time.sleep(0.2)

    def _take_job(self) -> dict | None:
        deadline = time.monotonic() + LONG_POLL_SECONDS
        with self.lock:
            while not self.queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self.lock.wait(remaining)
            job = self.jobs[self.queue.pop(0)]
            job.started = time.monotonic()
            self._set_status(job, "IN_PROGRESS")
            return {"id": job.id, "input": job.input}

    def _take_stop_signals(self) -> list[str]:
        deadline = time.monotonic() + LONG_POLL_SECONDS
        with self.lock:
            while not self.stop_signals:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return []
                self.lock.wait(remaining)
            ids, self.stop_signals = self.stop_signals, []
            return ids

    def _job_done(self, job_id: str, body: dict) -> None:
        with self.lock:
            job = self.jobs[job_id]
            if job.status in FINAL:
                return  # a cancelled or timed-out job stays that way
            if body.get("status") == "IN_PROGRESS":
                job.progress = body.get("output")
            elif body.get("error"):
                job.error = body["error"]
                self._set_status(job, "FAILED")
            else:
                job.output = body.get("output")
                self._set_status(job, "COMPLETED")
            self.lock.notify_all()

    def _job_stream(self, job_id: str, body: dict) -> None:
        with self.lock:
            self.jobs[job_id].stream.append({"output": body.get("output")})
            self.lock.notify_all()

    def _status(self, job_id: str) -> dict:
        with self.lock:
            job = self.jobs[job_id]
            reply = {"id": job.id, "status": job.status, "delayTime": 0, "executionTime": 0}
            if job.status == "IN_PROGRESS" and job.progress is not None:
                reply["output"] = job.progress
            if job.status == "COMPLETED":
                reply["output"] = job.output
            if job.status == "FAILED":
                reply["error"] = job.error
            return reply

    def _stream(self, job_id: str) -> dict:
        with self.lock:
            job = self.jobs[job_id]
            chunks = job.stream[job.stream_cursor :]
            job.stream_cursor = len(job.stream)
            return {"id": job.id, "status": job.status, "stream": chunks}

    def _cancel(self, job_id: str) -> dict:
        with self.lock:
            job = self.jobs[job_id]
            if job.status == "IN_QUEUE":
                self.queue.remove(job_id)
            if job.status == "IN_PROGRESS":
                self.stop_signals.append(job_id)
            if job.status not in FINAL:
                self._set_status(job, "CANCELLED")
            return {"id": job.id, "status": job.status}

    def _run(self, body: dict) -> dict:
        timeout_ms = (body.get("policy") or {}).get("executionTimeout")  # RunPod takes milliseconds
        job_id = self.submit(body.get("input"), timeout_ms / 1000 if timeout_ms else None)
        with self.lock:
            self.jobs[job_id].webhook = body.get("webhook")
        return {"id": job_id, "status": "IN_QUEUE"}

    # ------------------------------------------------------------------ http
    def _handler_class(self):
        fake = self
        route = re.compile(r"^/v2/(?P<ep>[^/]+)/(?P<op>[a-z-]+)(?:/(?P<a>[^/]+))?(?:/(?P<b>[^/]+))?$")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            _op = ""

            def log_message(self, *args):  # keep test output quiet
                pass

            def _reply(self, code: int, body: Any = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                if self._op in ("status", "stream", "cancel"):
                    fake.client_replies.append(data)
                self.send_response(code)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self._op in ("job-done", "job-stream"):
                    fake.worker_posts.append(raw)
                return json.loads(raw) if raw else {}

            def _dispatch(self, method: str) -> None:
                url = urlparse(self.path)
                match = route.match(url.path)
                if not match or match["ep"] != fake.endpoint_id:
                    return self._reply(404, {"error": "not found"})
                op, a = match["op"], match["a"]
                self._op = op
                body = self._body() if method == "POST" else {}
                auth = self.headers.get("Authorization", "")
                worker_ops = {"job-take", "job-stop", "job-done", "job-stream", "ping"}
                expected = fake.worker_key if op in worker_ops else f"Bearer {fake.client_key}"
                if auth != expected:
                    return self._reply(401, {"error": "unauthorized"})
                if op != "run" and op in {"status", "stream", "cancel"} and a not in fake.jobs:
                    return self._reply(404, {"error": "job not found"})
                if op == "job-take":
                    job = fake._take_job()
                    return self._reply(200, job) if job else self._reply(204)
                if op == "job-stop":
                    ids = fake._take_stop_signals()
                    return self._reply(200, {"jobsToStop": ids}) if ids else self._reply(204)
                if op == "job-done":
                    fake._job_done(match["b"], body)
                    return self._reply(200, {})
                if op == "job-stream":
                    fake._job_stream(match["b"], body)
                    return self._reply(200, {})
                if op == "ping":
                    fake.pings += 1
                    assert parse_qs(url.query).get("runpod_version")
                    return self._reply(200, {})
                if op == "run" and method == "POST":
                    return self._reply(200, fake._run(body))
                if op == "status":
                    return self._reply(200, fake._status(a))
                if op == "stream":
                    return self._reply(200, fake._stream(a))
                if op == "cancel" and method == "POST":
                    return self._reply(200, fake._cancel(a))
                return self._reply(404, {"error": "unknown operation"})

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

        return Handler
