"""`tunelab demo` end to end: the real CLI serves 127.0.0.1 on a free port, HTTP requests (bounded
timeouts) drive both tabs' API, then Ctrl-C stops it. Plus the API's one-line errors, in process."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from tunelab import tuners
from tunelab.demo import DemoApp, serve
from tunelab.models import zoo

TIMEOUT = 60  # seconds for any single request (generation on the tiny model takes well under 1 s)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_model_dir) -> Path:
    """A run folder with two result files and a LoRA adapter whose B is random (so its output differs)."""
    run_dir = tmp_path_factory.mktemp("demo-run")
    (run_dir / "results").mkdir()
    for label, params, score in (("full", 100_000, 0.5), ("lora", 2_000, 0.45)):
        record = {"run_id": f"{label}-n8-s0", "experiment": "demo", "method": label, "method_label": label,
                  "model": str(small_model_dir), "objective": "sft", "train_size": 8, "seed": 0,
                  "metrics": {"score": score}, "trainable_parameters": params, "trainable_percent": 1.0,
                  "train_seconds": 3.0, "train_tokens_per_second": 100.0, "peak_memory_mb": 400.0 + params / 1000,
                  "history": [], "config": {"data": {"template": "plain"}}}
        (run_dir / "results" / f"{label}-n8-s0.json").write_text(json.dumps(record))
    model, _ = zoo.load(str(small_model_dir), progress=False)
    torch.manual_seed(0)
    tuners.apply(model, "lora", r=4, target_modules="all-linear")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    tuners.save(model, run_dir / "adapters" / "lora-n8-s0")
    return run_dir


def request(base: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
            raw, status, kind = response.read(), response.status, response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        raw, status, kind = error.read(), error.code, error.headers["Content-Type"]
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()


def read_address(process: subprocess.Popen, deadline: float) -> str:
    line = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if "http://" in line:
                return line.split("http://")[1].split("/")[0]
        if process.poll() is not None:
            break
    raise AssertionError(f"demo did not start: {line!r} {process.stderr.read() if process.poll() is not None else ''}")


def test_demo_cli_serves_both_tabs_and_stops_on_ctrl_c(run_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "demo", "--run", str(run_dir), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        address = read_address(process, time.monotonic() + 90)
        assert address.startswith("127.0.0.1:")
        base = f"http://{address}"
        status, page = request(base, "/")
        assert status == 200 and "Compare" in page and "Results" in page
        status, options = request(base, "/api/options")
        assert options["adapters"] == [{"name": "lora-n8-s0", "path": str(run_dir / "adapters" / "lora-n8-s0")}]
        body = {"model": options["models"][0], "adapters": ["lora-n8-s0"], "prompt": "Summarize the note: fever",
                "max_new_tokens": 6}
        status, answer = request(base, "/api/generate", body)
        assert status == 200, answer
        names = [o["name"] for o in answer["outputs"]]
        assert names == [f"{options['models'][0]} (base)", "lora-n8-s0"]
        assert all(o["latency_ms"] > 0 for o in answer["outputs"])
        assert answer["outputs"][0]["text"] != answer["outputs"][1]["text"]  # the adapter changes the output
        status, results = request(base, "/api/results")
        assert status == 200 and [r["method"] for r in results["rows"]] == ["full", "lora"]
        assert set(results["plots"]) == {"pareto_memory", "pareto_time"}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)  # a loaded 2-core machine can take a while to finish a generation
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0  # Ctrl-C is how a demo is stopped
    assert "demo stopped" in process.stdout.read()


@pytest.fixture()
def server(run_dir):
    httpd = serve(DemoApp(run_dir), port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def test_bad_requests_get_one_line_errors(server):
    status, answer = request(server, "/api/generate", {"adapters": ["nope"], "prompt": "hi"})
    assert status == 400 and "unknown adapter 'nope'" in answer["error"]
    status, answer = request(server, "/api/generate", {"prompt": "  "})
    assert status == 400 and answer["error"] == "type a prompt"
    status, answer = request(server, "/api/generate", {"prompt": "hi", "max_new_tokens": 10_000})
    assert status == 400 and "max_new_tokens" in answer["error"]
    status, _ = request(server, "/nowhere")
    assert status == 404


def test_demo_without_a_run_has_no_results_tab_data(small_model_dir):
    app = DemoApp(models=[str(small_model_dir)])
    assert app.results_payload() is None
    assert app.options() == {"models": [str(small_model_dir)], "adapters": []}


def test_page_fills_its_controls_in_chromium(server, run_dir):
    from tunelab.experiments.slides import chromium_command, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium binary (install Debian's `chromium` package); browser check skipped")
    out = subprocess.run(chromium_command(binary, "--virtual-time-budget=5000", "--dump-dom", server + "/"),
                         capture_output=True, text=True, timeout=90)
    assert f"<option>{DemoApp(run_dir).models[0]}</option>" in out.stdout  # the script ran and fetched options
    assert 'value="lora-n8-s0"' in out.stdout


def test_results_tab_prices_a_run_that_has_a_price(run_dir, tmp_path):
    """A run with report.price_per_hour: the results payload carries each row's training cost (seconds /
    3600 x price) and the cost Pareto plot; without one it has neither."""
    import shutil

    from tunelab.experiments import pricing

    assert pricing.COST_KEY not in DemoApp(run_dir).results_payload()["rows"][0]
    priced = tmp_path / "priced"
    shutil.copytree(run_dir / "results", priced / "results")
    (priced / "config.yaml").write_text("report: {price_per_hour: 7.2}\n")
    payload = DemoApp(priced).results_payload()
    assert payload["price_per_hour"] == 7.2 and pricing.PLOT_NAME in payload["plots"]
    assert [row[pricing.COST_KEY] for row in payload["rows"]] == pytest.approx([3.0 / 3600 * 7.2] * 2)
