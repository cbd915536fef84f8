"""The ``tunelab`` command line (typer).

Every user mistake surfaces as ``error: <one line>`` on stderr with exit code 2 — never a traceback.
Grid cells that failed while the others finished end ``tunelab run`` with one such line and exit code 1.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tunelab.errors import ConfigError, ModelError, TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tunelab: fine-tune transformer LMs with PEFT methods and compare them in one command.")
console = Console()
err_console = Console(stderr=True)


def packaged_config(name: str) -> Path:
    """Path of a YAML shipped inside the package (``tunelab/configs/<name>.yaml``)."""
    return Path(str(resources.files("tunelab") / "configs" / f"{name}.yaml"))


def _results_table(results: list[dict], price_per_hour: float | None = None) -> Table:
    """The console summary; with a price per device-hour (the spec's or the run's ``report.price_per_hour``)
    a training-cost column, as in report.md."""
    from tunelab.experiments import pricing
    from tunelab.experiments.report import summarize

    rows = summarize(results, price_per_hour)
    seeded = any(row["seeds"] > 1 for row in rows)  # as in report.md: mean ± half-width of the 95% CI
    table = Table(title="Held-out results" + (" (mean ± 95% CI over seeds)" if seeded else ""))
    columns = ["method", "train size", "score", "trainable params", "% of model", "train s", "peak RSS MB"]
    if pricing.priced(rows):
        columns.append(f"cost @{price_per_hour:g}/h")
    for column in columns:
        if column == "method":
            table.add_column(column, justify="left", overflow="fold")  # long labels wrap, never "…"
        else:
            table.add_column(column, justify="right")
    for row in rows:
        score = f"{row['score']:.4f}" + (f" ± {row['score_ci95']:.4f}" if row["seeds"] > 1 else "")
        cells = [row["method"], str(row["train_size"]), score, f"{row['trainable_parameters']:,}",
                 f"{row['trainable_percent']:.2f}", f"{row['train_seconds']:.0f}", f"{row['peak_memory_mb']:.0f}"]
        if pricing.priced(rows):
            cells.append(pricing.money(row[pricing.COST_KEY]))
        table.add_row(*cells)
    return table


class Interrupted(TunelabError):
    """Ctrl-C during a run: exit 130 with the command that resumes it."""

    exit_code = 130


def _run(config: Path, overrides: list[str], in_process: bool, resume: bool = False, jobs: int = 1) -> list[dict]:
    import shlex

    from tunelab.experiments.jobs import CellsFailed
    from tunelab.experiments.runner import run_experiment
    from tunelab.experiments.spec import load_spec

    spec = load_spec(config, overrides)
    console.print(f"[bold]tunelab run[/bold] {spec.name} → {spec.run_dir}")
    try:
        results = run_experiment(spec, progress=True, isolate=not in_process, console=console, resume=resume,
                                 jobs=jobs)
    except KeyboardInterrupt:
        again = shlex.join(["tunelab", "run", str(config), *overrides, "--resume"])
        raise Interrupted(f"interrupted; finished cells are kept in {spec.run_dir}, and `{again}` continues "
                          "the unfinished one (from its last checkpoint when train.save_every is set)") from None
    except CellsFailed as failed:  # the others finished and the report lists the failed ones: show both
        if failed.results:
            console.print(_results_table(failed.results, spec.report.price_per_hour))
        console.print(f"report: {spec.run_dir / 'report.md'} and {spec.run_dir / 'report.html'}")
        raise
    if not results:  # a non-main rank of a data-parallel launch: rank 0 prints
        return results
    console.print(_results_table(results, spec.report.price_per_hour))
    console.print(f"report: {spec.run_dir / 'report.md'} and {spec.run_dir / 'report.html'}")
    return results


@app.command()
def quickstart(
    overrides: Annotated[list[str] | None, typer.Argument(help="Optional key=value overrides.")] = None,
    in_process: Annotated[bool, typer.Option(help="Run cells in this process (faster start, shared memory peak).")] = False,
) -> None:
    """Pretrain tiny-llama if needed, fine-tune full vs LoRA (DoRA) on the medical domain, report."""
    results = _run(packaged_config("quickstart"), overrides or [], in_process)
    scores = {r["method_label"]: r["metrics"]["score"] for r in results}
    full = scores.pop("full", None)
    for label, score in scores.items() if full else ():
        console.print(f"{label} reaches {100 * score / full:.1f}% of full fine-tuning's held-out "
                      f"score ({score:.4f} vs {full:.4f}).")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see docs/experiments.md).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.max_steps=50")] = None,
    in_process: Annotated[bool, typer.Option(help="Run cells in this process instead of one subprocess each.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (an error if there is none); a plain "
                                         "rerun resumes too.")] = False,
    processes: Annotated[int, typer.Option(min=1, help="Train every cell with N data-parallel processes (DDP via "
                                           "torchrun; train.batch_size is per process, see docs/scale.md).")] = 1,
    jobs: Annotated[int, typer.Option(min=1, help="Run up to N grid cells at once, each in its own subprocess "
                                      "with cpu_count // N threads (see docs/experiments.md).")] = 1,
) -> None:
    """Run an experiment spec: every grid cell, then the report. Finished cells are skipped, an unfinished
    one continues from its last checkpoint, and a cell whose config changed runs again. A cell that fails
    is recorded and listed in the report while the others go on; the command then exits with code 1."""
    from tunelab.experiments import distributed
    from tunelab.experiments import jobs as parallel

    parallel.check(jobs, not in_process, max(processes, distributed.world_size()))
    if processes > 1 and distributed.world_size() == 1:
        distributed.relaunch(processes, ["run", str(config), *(overrides or []), "--in-process",
                                         *(["--resume"] if resume else [])])
        return
    _run(config, overrides or [], in_process, resume, jobs)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory, e.g. runs/quickstart.")],
    price_per_hour: Annotated[float | None, typer.Option(help="Price of one device-hour (any currency) for the "
                                                          "cost columns, frontier and plot; default: the run's "
                                                          "report.price_per_hour. Reruns nothing.")] = None,
) -> None:
    """Rebuild report.md and report.html from a run's result files (at another price with --price-per-hour)."""
    from tunelab.experiments.report import load_results, write_report

    markdown, html_path = write_report(run_dir, price_per_hour)
    if any((run_dir / "results").glob("*.json")):  # else every cell failed: the report lists the failures
        from tunelab.experiments import pricing

        console.print(_results_table(load_results(run_dir), pricing.price_per_hour(run_dir, price_per_hour)))
    console.print(f"report: {markdown} and {html_path}")


@app.command()
def methods() -> None:
    """List the registered PEFT methods with a one-line summary each."""
    from tunelab import tuners
    from tunelab.tuners import registry

    width = max(map(len, tuners.methods()))
    for name in tuners.methods():
        console.print(f"{name:<{width}}  {registry.get(name).summary}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def objectives() -> None:
    """List the registered training objectives with a one-line summary each."""
    from tunelab.experiments import registry

    width = max(map(len, registry.objectives()))
    for name in registry.objectives():
        console.print(f"{name:<{width}}  {registry.get_objective(name).summary}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def pretrain(
    name: Annotated[str, typer.Argument(help="Tiny preset: tiny-llama, tiny-llama-teacher or tiny-clip.")] = "tiny-llama",
    seed: int = 0,
    force: Annotated[bool, typer.Option(help="Pretrain again even if cached.")] = False,
) -> None:
    """Pretrain a tiny preset on the built-in world and cache it under $TUNELAB_HOME."""
    from tunelab.models import tiny

    presets = (*tiny.PRESETS, "tiny-clip")
    if name not in presets:
        raise ModelError(f"unknown tiny preset {name!r}; choose one of: {', '.join(presets)}")
    if name == "tiny-clip":
        from tunelab.multimodal import clip

        path = clip.pretrain(seed=seed, progress=True, force=force)
        info = clip.pretrain_report(seed)
        console.print(f"{name}: {info['parameters']:,} parameters, zero-shot accuracy base "
                      f"{info['zero_shot_base_task']:.3f} / novel {info['zero_shot_novel_task']:.3f}, "
                      f"{info['seconds']:.0f} s → {path}")
        return
    path = tiny.pretrain(name, seed=seed, progress=True, force=force)
    info = tiny.pretrain_report(name, seed)
    console.print(f"{name}: {info['parameters']:,} parameters, held-out perplexity {info['heldout_perplexity']:.2f} "
                  f"(unigram {info['unigram_perplexity']:.1f}), {info['seconds']:.0f} s → {path}")


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    model: Annotated[str, typer.Option(help="Preset, local path or hub id.")] = "tiny-llama",
    adapter: Annotated[Path | None, typer.Option(help="Adapter directory saved by tunelab or HF PEFT.")] = None,
    max_new_tokens: int = 48,
    template: Annotated[str, typer.Option(
        help="Prompt template: auto (the model's own chat template when its tokenizer has one, else plain), "
        "plain, alpaca, chatml, none.")] = "auto",
    layers: Annotated[str | None, typer.Option(help="Keep only these decoder layers, e.g. 0,3 (a run's "
                                               "model.layers: its adapter was trained on that student).")] = None,
) -> None:
    """Greedy generation (KV cache) from a model, optionally with an adapter."""
    from tunelab.eval.generate import greedy

    loaded, tokenizer = _load_model(model)
    if layers is not None:
        from tunelab.distill.student import init_from_teacher

        loaded = init_from_teacher(loaded, layers=_layer_list(layers))
    if adapter is not None:
        _load_adapter(loaded, adapter)
    texts = prompt
    if template != "none":
        from tunelab.data.templates import render_prompt

        texts = [render_prompt({"prompt": p}, template, tokenizer) for p in prompt]
    for source, output in zip(prompt, greedy(loaded, tokenizer, texts, max_new_tokens=max_new_tokens), strict=True):
        console.print(f"[bold]{source}[/bold]\n{output}\n")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--layers takes layer indices separated by commas, e.g. 0,3; got {text!r}") from None


@app.command()
def student(
    model: Annotated[str, typer.Argument(help="The bigger model (preset, local path or hub id) to take layers from.")],
    output: Annotated[Path, typer.Argument(help="New directory for the student (must not exist).")],
    layers: Annotated[str | None, typer.Option(help="Teacher layers to keep, in order, e.g. 0,3.")] = None,
    every: Annotated[int | None, typer.Option(min=1, help="Or keep layers 0, k, 2k, ... (DistilBERT: 2).")] = None,
) -> None:
    """Write a smaller student initialised from a model's layers (DistilBERT), loadable as model: {name: DIR}."""
    from tunelab.distill.student import write_student

    if output.exists():
        raise ConfigError(f"{output} already exists; pick a new directory for the student")
    if (layers is None) == (every is None):
        raise ConfigError("give exactly one of --layers 0,3 or --every 2")
    path = write_student(model, output, every=every, layers=None if layers is None else _layer_list(layers))
    from tunelab.models import zoo

    loaded, _ = zoo.load(str(path), progress=False)
    console.print(f"{path}: {loaded.config.num_hidden_layers} layers, "
                  f"{sum(p.numel() for p in loaded.parameters()):,} parameters (from {model})")


def _load_model(name: str):
    from tunelab.models import zoo

    try:
        return zoo.load(name)
    except TunelabError:
        raise
    except Exception as error:  # empty, truncated or corrupt model files
        raise ModelError(f"cannot load model {name!r}: {type(error).__name__}: {_first_line(error)}") from None


def _load_adapter(model, adapter: Path) -> None:
    """``tuners.load`` with every way an adapter directory can be broken reported as one line."""
    import pickle

    from tunelab import tuners

    if not adapter.exists():
        raise TunelabError(f"adapter directory not found: {adapter}")
    if not adapter.is_dir():
        raise TunelabError(f"adapter path {adapter} is a file; pass the directory holding the adapter files")
    try:
        tuners.load(model, adapter)
    except TunelabError:
        raise
    except pickle.UnpicklingError:
        raise TunelabError(f"adapter {adapter}: refusing a pickle file (only safetensors adapters load)") from None
    except Exception as error:  # corrupt safetensors, malformed adapter_config.json, ...
        raise TunelabError(f"adapter {adapter} cannot be loaded: {type(error).__name__}: {_first_line(error)}") from None
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not bool(parameter.isfinite().all()):
            raise TunelabError(f"adapter {adapter}: tensor {name} holds NaN or infinite values; retrain or "
                               "re-export the adapter")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _usage_error(error: Exception) -> str | None:
    """The one-line message of a click usage error (typer bundles its own click: both are recognised)."""
    names = {"UsageError", "NoSuchOption", "BadOptionUsage", "BadArgumentUsage", "BadParameter",
             "MissingParameter", "NoArgsIsHelpError"}
    if not any(cls.__name__ in names for cls in type(error).__mro__):
        return None
    ctx = getattr(error, "ctx", None)
    usage = ctx.get_usage().replace("\n", " ").strip() if ctx is not None else "Usage: tunelab COMMAND [ARGS]..."
    usage = " ".join(usage.replace("python -m tunelab.cli", "tunelab").split())
    if type(error).__name__ == "NoArgsIsHelpError":
        message = "missing command" if ctx is None or ctx.parent is None else "missing arguments"
    else:
        message = error.format_message() if hasattr(error, "format_message") else str(error)
    return f"{' '.join(message.split())} ({usage}; see --help)"


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one line and exit code 2; Ctrl-C exits 130."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=False, prog_name="tunelab")
    except TunelabError as error:
        err_console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        return error.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False, highlight=False)
        return 130
    except Exception as error:  # click's usage errors arrive here in non-standalone mode
        message = _usage_error(error)
        if message is not None:
            err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
            return 2
        if type(error).__name__ == "Abort":
            return 130
        raise
    return 0



# --- issue 15: tune / slides / demo (kept together at the end; logic lives in experiments/ and demo/) ---


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="Experiment YAML with a search: section (see docs/tune.md).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.max_steps=50")] = None,
    trials: Annotated[int, typer.Option(help="Trials this process runs (per method with --per-method).")] = 20,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL shared by several workers "
                                                "(default: sqlite:///runs/<name>/tune.db).")] = None,
    study_name: Annotated[str | None, typer.Option(help="Study name (default: the experiment name).")] = None,
    per_method: Annotated[bool | None, typer.Option("--per-method/--single", help="Equal budget: tune every "
                                                   "method of grid.methods, then compare their best configs "
                                                   "(default: search.per_method).")] = None,
    compare: Annotated[bool, typer.Option(help="With --per-method, run the comparison of the best configs.")] = True,
) -> None:
    """Search hyper-parameters with Optuna (TPE + median pruning); writes best.yaml and tune_report.md/html."""
    from tunelab.experiments.spec import load_spec
    from tunelab.experiments.tune import tune as run_tune

    spec = load_spec(config, overrides or [])
    console.print(f"[bold]tunelab tune[/bold] {spec.name} → {spec.run_dir}")
    outcome = run_tune(spec, trials, storage=storage, study_name=study_name, per_method=per_method,
                       compare=compare, console=console)
    for label, study in outcome.studies.items():
        done = [t for t in study.trials if t.value is not None]
        if done:
            console.print(f"{label}: best {spec.search.metric} {study.best_value:.4f} (trial {study.best_trial.number}"
                          f" of {len(study.trials)})", markup=False)
    if outcome.best_yaml is not None:
        console.print(f"best configuration: {outcome.best_yaml}", markup=False)
    console.print(f"report: {outcome.report}", markup=False)



@app.command()
def slides(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with results, e.g. runs/quickstart.")],
    pdf: Annotated[bool, typer.Option(help="Also print slides.pdf with headless Chromium when installed.")] = True,
    price_per_hour: Annotated[float | None, typer.Option(
        help="Price of one device-hour for the cost slide and frontier; default: the run's "
             "report.price_per_hour.")] = None,
) -> None:
    """Write a ~10-slide deck (slides.html, self-contained, and slides.pdf) from a run's result files."""
    from tunelab.experiments.slides import write_slides

    html_path, pdf_path = write_slides(run_dir, pdf=pdf, price_per_hour=price_per_hour)
    console.print(f"slides: {html_path}", markup=False)
    if pdf_path is not None:
        console.print(f"pdf: {pdf_path}", markup=False)
    elif pdf:
        console.print("pdf: skipped (no Chromium found; install Debian's `chromium` package or set "
                      "TUNELAB_CHROMIUM to a Chromium binary)", markup=False)



@app.command()
def demo(
    run: Annotated[Path | None, typer.Option(help="A run directory: its model, its adapters and its results tab.")] = None,
    model: Annotated[list[str] | None, typer.Option(help="Base model(s) to offer (preset, path or hub id).")] = None,
    adapter: Annotated[list[Path] | None, typer.Option(help="Extra adapter directories to offer.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind (local only by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 = any free port).")] = 7860,
) -> None:
    """Serve a local web page: base model vs its adapters side by side (with latency), and a run's results."""
    from tunelab.demo import DemoApp, serve

    server = serve(DemoApp(run, models=model, adapters=adapter), host, port)
    address, bound = server.server_address[:2]
    console.print(f"tunelab demo on http://{address}:{bound}/ (Ctrl-C stops it)", markup=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # the way to stop a demo: a clean exit, not an interruption
        console.print("demo stopped", markup=False)
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
