"""The demo server: Python's ``http.server`` (no extra dependency), one page with two tabs.

- **Compare**: pick a base model and one or more saved adapters (``RUN_DIR/adapters/*`` or any
  ``--adapter`` directory), type a prompt; each column is one model (the base, then base + each
  adapter) with its greedy output and its latency (wall time of the generation, milliseconds).
- **Results**: the run's results table (mean ± 95% CI over seeds) and the Pareto plots (quality vs
  peak memory and vs train time, from :mod:`tunelab.experiments.analysis`).

JSON API (what the page calls, and what the tests drive):

| route | answer |
|---|---|
| ``GET /`` | the page |
| ``GET /api/options`` | ``{"models": [...], "adapters": [{"name", "path"}]}`` |
| ``POST /api/generate`` | body ``{"model", "adapters": [names], "prompt", "max_new_tokens"}`` → ``{"outputs": [{"name", "text", "latency_ms"}]}`` |
| ``GET /api/results`` | ``{"rows": [...], "plots": {"pareto_memory": base64 PNG, ...}}`` (404 without a run) |

Models are loaded once and cached; each adapter is loaded onto its own copy of the base model.
Generation runs one request at a time (a lock: CPU inference gains nothing from overlapping).
The server binds 127.0.0.1 by default: it is a local demo, not a service.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tunelab.demo.page import PAGE
from tunelab.errors import TunelabError

MAX_NEW_TOKENS_LIMIT = 256  # a demo request must stay short
MAX_BODY_BYTES = 1 << 20


class DemoApp:
    """Models, adapters and results behind the page; independent of HTTP (tests call it directly too)."""

    def __init__(self, run_dir: str | Path | None = None, models: list[str] | None = None,
                 adapters: list[str | Path] | None = None, template: str = "auto") -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.results = self._load_results()
        run_model = self.results[0]["model"] if self.results else None
        # a run whose student kept only some layers of its model (model.layers): its adapters fit that student
        self.run_layers = (self.results[0].get("config", {}).get("model", {}).get("layers")
                           if self.results else None)
        self.models = list(dict.fromkeys([m for m in [run_model, *(models or [])] if m] or ["tiny-llama"]))
        self.adapters = self._find_adapters(adapters or [])
        if self.results:
            template = self.results[0].get("config", {}).get("data", {}).get("template", template)
        self.template = template
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _load_results(self) -> list[dict]:
        from tunelab.experiments.report import load_results

        if self.run_dir is None:
            return []
        return load_results(self.run_dir)  # a DataError (one line) when the folder holds no results

    def _find_adapters(self, extra: list[str | Path]) -> dict[str, Path]:
        found: dict[str, Path] = {}
        if self.run_dir is not None and (self.run_dir / "adapters").is_dir():
            for path in sorted((self.run_dir / "adapters").iterdir()):
                if path.is_dir():
                    found[path.name] = path
        for path in map(Path, extra):
            if not path.is_dir():
                raise TunelabError(f"adapter directory not found: {path}")
            found[path.name] = path
        return found

    def options(self) -> dict:
        return {"models": self.models, "adapters": [{"name": n, "path": str(p)} for n, p in self.adapters.items()]}

    def _model(self, name: str, adapter: str | None):
        """(model, tokenizer) of a base model, or of a copy of it with one adapter loaded (cached)."""
        from tunelab import tuners
        from tunelab.models import zoo

        key = f"{name}\0{adapter or ''}"
        if key not in self._models:
            if adapter is None:
                model, tokenizer = _one_line(f"cannot load model {name!r}", zoo.load, name, progress=False)
                if self.run_layers and self.results and name == self.results[0]["model"]:
                    from tunelab.distill.student import init_from_teacher

                    model = init_from_teacher(model, layers=self.run_layers).eval()
                self._models[key] = (model, tokenizer)
            else:
                base, tokenizer = self._model(name, None)
                model = copy.deepcopy(base)
                _one_line(f"cannot load adapter {adapter!r}", tuners.load, model, self.adapters[adapter])
                model.eval()
                self._models[key] = (model, tokenizer)
        return self._models[key]

    def generate(self, request: dict) -> dict:
        from tunelab.data.templates import render_prompt
        from tunelab.eval.generate import greedy

        name = request.get("model") or self.models[0]
        if name not in self.models:
            raise TunelabError(f"unknown model {name!r}; choose one of {', '.join(self.models)}")
        chosen = list(request.get("adapters") or [])
        unknown = [a for a in chosen if a not in self.adapters]
        if unknown:
            raise TunelabError(f"unknown adapter {unknown[0]!r}; choose from {', '.join(self.adapters) or 'none'}")
        prompt = str(request.get("prompt") or "").strip()
        if not prompt:
            raise TunelabError("type a prompt")
        max_new = int(request.get("max_new_tokens") or 32)
        if not 1 <= max_new <= MAX_NEW_TOKENS_LIMIT:
            raise TunelabError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}")
        outputs = []
        with self._lock:
            for adapter in [None, *chosen]:
                model, tokenizer = self._model(name, adapter)
                text = render_prompt({"prompt": prompt}, self.template, tokenizer)
                started = time.perf_counter()
                output = greedy(model, tokenizer, [text], max_new_tokens=max_new, progress=False)[0]
                outputs.append({"name": adapter or f"{name} (base)", "text": output,
                                "latency_ms": round((time.perf_counter() - started) * 1000, 1)})
        return {"outputs": outputs}

    def results_payload(self) -> dict | None:
        from tunelab.experiments import analysis, pricing
        from tunelab.experiments.report import summarize

        if not self.results:
            return None
        price = pricing.price_per_hour(self.run_dir)  # the run's report.price_per_hour: a cost column and plot
        rows = summarize(self.results, price)
        plots = {"pareto_memory": analysis.plot_pareto(rows, "peak_memory_mb", "peak memory (MB, RSS)"),
                 "pareto_time": analysis.plot_pareto(rows, "train_seconds", "train time (s)")}
        keep = ["method", "train_size", "seeds", "score", "score_ci95", "trainable_parameters", "peak_memory_mb",
                "train_seconds", "latency_ms"]
        if pricing.priced(rows):
            plots[pricing.PLOT_NAME] = analysis.plot_pareto(rows, pricing.COST_KEY, pricing.cost_label(rows))
            keep.append(pricing.COST_KEY)
        return {"experiment": self.results[0].get("experiment", ""), "price_per_hour": price,
                "rows": [{k: row[k] for k in keep} for row in rows],
                "plots": {k: base64.b64encode(v).decode() for k, v in plots.items()}}


def _one_line(what: str, function, *args, **kwargs):
    """Call ``function``; any failure becomes a one-line TunelabError (shown on the page, never a traceback)."""
    try:
        return function(*args, **kwargs)
    except TunelabError:
        raise
    except Exception as error:  # corrupt files, a hub id without network, ...
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise TunelabError(f"{what}: {type(error).__name__}: {first}") from None


def _handler(app: DemoApp):
    class Handler(BaseHTTPRequestHandler):
        server_version = "tunelab-demo"

        def log_message(self, format: str, *args) -> None:  # quiet: the CLI prints the address once
            return

        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode())

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif self.path == "/api/options":
                self._json(200, app.options())
            elif self.path == "/api/results":
                payload = app.results_payload()
                self._json(200 if payload else 404, payload or {"error": "no run given (tunelab demo --run RUN_DIR)"})
            else:
                self._json(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            if self.path != "/api/generate":
                self._json(404, {"error": f"no route {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self._json(413, {"error": "request too large"})
                return
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("expected a JSON object")
                self._json(200, app.generate(request))
            except (TunelabError, ValueError) as error:
                self._json(400, {"error": str(error)})

    return Handler


def serve(app: DemoApp, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A started-later server (call ``serve_forever``; ``port=0`` picks a free port: ``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), _handler(app))
    server.daemon_threads = True
    return server
