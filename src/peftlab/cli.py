"""The `peftlab` command: one function per subcommand; errors become messages and exit codes.

Exit codes: 0 success, 1 bad input or a failed run, 2 bad usage (flags, config).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from peftlab import __version__
from peftlab.errors import DataError, FilesystemError, PeftlabError

app = typer.Typer(name="peftlab", help="Compare full fine-tuning with PEFT methods from one config.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Inspect data without training.", no_args_is_help=True)
models_app = typer.Typer(help="Shipped model aliases: list and prepare.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")

logger = logging.getLogger("peftlab")

ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML), e.g. configs/default.yaml.")]
WorkersOpt = Annotated[int, typer.Option(help="Train up to N method/seed runs at once, each in its own process: one "
                                              "GPU (or group of GPUs) each, or cores/N CPU threads each.")]
ClaimTimeoutOpt = Annotated[float, typer.Option(min=1.0, help="Seconds after which a method claim or run lock that its holder "
                                                     "stopped refreshing counts as stale (taken over by --resume).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: --set training.epochs=1 (repeatable).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"peftlab {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging, with the Trainer's dict logs and the libraries' own logs and bars.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    """peftlab: one config, every method trained on the same data and split, one report."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("peftlab").setLevel(level)
    from peftlab.console import quiet_third_party

    quiet_third_party(verbose)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models are local folders
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory (default: output.dir or runs/<config name>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run: keep finished methods, resume the last from its checkpoint.")] = False,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated method names to run (default: all).")] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Train every method N times, at seeds training.seed, "
                                                             "+1, ...; the report gives mean ± std (sets training.seeds).")] = None,
    tune: Annotated[bool, typer.Option("--tune", help="First tune every method (tune: section) on the validation split in RUN_DIR-tune, then run the tuned config.")] = False,
    storage: Annotated[Optional[str], typer.Option(help="With --tune: Optuna storage URL (journal:PATH, sqlite:///PATH.db, a database URL); default a journal file in RUN_DIR-tune.")] = None,
    workers: WorkersOpt = 1,
    claim_timeout: ClaimTimeoutOpt = 600.0,
) -> None:
    """Train and evaluate every method in CONFIG, then write the report.

    Several `peftlab run CONFIG --methods X` processes may share one --output (one machine, or several over a
    shared filesystem): each claims its methods, and each report merges what has finished (docs/scaling.md).
    """
    from peftlab.config import load_config
    from peftlab.experiment import default_run_dir, run_experiment
    from peftlab.report import render_results_console

    selected = _method_list(methods)
    _check_workers_flag(workers)
    if storage is not None and not tune:
        raise typer.BadParameter("--storage is for --tune (or `peftlab tune`)", param_hint="--storage")
    cfg = load_config(config, set_)
    if seeds is not None:
        first = cfg.training.seed
        cfg = load_config(config, [*(set_ or []), f"training.seeds=[{', '.join(str(first + i) for i in range(seeds))}]"])
    run_dir = output or default_run_dir(cfg, config)
    if tune:
        from peftlab.report import render_study_console
        from peftlab.tune import tune_and_run

        study, experiment = tune_and_run(cfg, run_dir, methods=selected, storage=storage, overwrite=overwrite,
                                         resume=resume, name=cfg.name or config.stem, workers=workers)
        render_study_console(study)
    else:
        experiment = run_experiment(cfg, run_dir, overwrite=overwrite, resume=resume, methods=selected,
                                    workers=workers, claim_timeout_s=claim_timeout)
    render_results_console(experiment)
    typer.echo(f"report: {run_dir / 'report.html'} (also report.md, results.csv, results.json)")
    # This invocation's runs decide its exit code; the report also holds other invocations' methods.
    failed = [r for r in experiment.runs if r.status != "ok" and (selected is None or r.name in selected)]
    if failed:
        for r in failed:
            typer.secho(f"error: {r.name} failed: {r.error}", err=True, fg=typer.colors.RED)
        rest = "the others' results are in the report" if len(failed) < len(experiment.runs) else "none finished"
        typer.secho(f"{len(failed)} of {len(experiment.runs)} method(s) failed; {rest}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


def _check_workers_flag(workers: int) -> None:
    if workers < 1:
        raise typer.BadParameter(f"must be 1 or more (how many runs train at once), got {workers}",
                                 param_hint="--workers")


def _method_list(methods: str | None) -> list[str] | None:
    if methods is None:
        return None
    selected = [m.strip() for m in methods.split(",") if m.strip()]
    if not selected:
        raise typer.BadParameter(f"{methods!r} names no method; give e.g. --methods full,lora", param_hint="--methods")
    return selected


@app.command("tune")
def tune_command(
    config: ConfigArg,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Tune directory (default: the run directory with -tune appended).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated method names to tune (default: all).")] = None,
    trials: Annotated[Optional[int], typer.Option(help="Trials per method, the same for every method (sets tune.trials).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL shared by workers: journal:PATH, sqlite:///PATH.db or a database URL (default: a journal file in the tune directory).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the studies of an existing tune directory; finished trials count toward the budget.")] = False,
    workers: WorkersOpt = 1,
) -> None:
    """Tune each method of CONFIG on the validation split (an Optuna study per method, one budget); write tuned.yaml."""
    from peftlab.config import load_config
    from peftlab.report import render_study_console
    from peftlab.tune import TUNED, default_tune_dir, tune

    selected = _method_list(methods)
    _check_workers_flag(workers)
    overrides = [*(set_ or []), *([f"tune.trials={trials}"] if trials is not None else [])]
    cfg = load_config(config, overrides)
    tune_dir = output or default_tune_dir(cfg, config)
    study = tune(cfg, tune_dir, methods=selected, storage=storage, resume=resume, name=cfg.name or config.stem,
                 workers=workers)
    render_study_console(study)
    typer.echo(f"tuned config: {tune_dir / TUNED} (run it: peftlab run {tune_dir / TUNED}); "
               f"report: {tune_dir / 'report.html'}")


@data_app.command("check")
def data_check(
    config: ConfigArg,
    set_: SetOpt = None,
    tokens: Annotated[bool, typer.Option(help="Also count tokens and truncation (loads the tokenizer).")] = True,
) -> None:
    """Load and validate the data of CONFIG without training; print the data report."""
    from peftlab.config import load_config
    from peftlab.data import prepare_data
    from peftlab.report import render_data_report_console

    cfg = load_config(config, set_)
    tokenizer = None
    if tokens:
        from peftlab.models import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(cfg.model.path), cfg.model.trust_remote_code)
    data = prepare_data(cfg.data, cfg.task, tokenizer)
    render_data_report_console(data.report)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory (results.json, or config.yaml and method results).")]) -> None:
    """Re-render report.md/html, results.csv and plots from a run's saved results.

    In a run directory (config.yaml) it merges every method that has finished, whichever process trained it, and
    says which are missing.
    """
    from peftlab.report import render_results_console, write_report
    from peftlab.results import ExperimentResult

    if (run_dir / "config.yaml").is_file():
        from peftlab.experiment import report_run_dir

        experiment = report_run_dir(run_dir)
        render_results_console(experiment)
        typer.echo(f"report: {run_dir / 'report.html'}")
        return
    results = run_dir / "results.json"
    if not results.is_file():
        raise PeftlabError(f"{results} not found: {run_dir} is not a finished peftlab run")
    try:
        experiment = ExperimentResult.load(results)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # truncated JSON or another schema
        raise PeftlabError(f"{results} is damaged or not a peftlab results file ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); rerun `peftlab run ... --resume` to rewrite it") from None
    write_report(experiment, run_dir)
    render_results_console(experiment)
    typer.echo(f"report: {run_dir / 'report.html'}")


@app.command("methods")
def list_methods(
    name: Annotated[Optional[str], typer.Argument(help="A method: show its options, defaults and search space.")] = None,
) -> None:
    """List the selectable methods and what each can do; `peftlab methods NAME` shows one method's options."""
    from rich.console import Console
    from rich.table import Table

    from peftlab.errors import ConfigError
    from peftlab.methods import describe_methods

    rows = {row["method"]: row for row in describe_methods()}
    console = Console(width=100)
    if name is not None:
        if name not in rows:
            raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(rows)}")
        _show_method(console, rows[name])
        return
    table = Table(title=f"peftlab methods ({len(rows) - 1} named, and peft: any tuner by name)")
    for column in ("method", "what it trains", "options", "lr", "merge", "mixed"):
        table.add_column(column, overflow="fold")
    for row in rows.values():
        merge = "yes" if row["mergeable"] else "no" if row["adapter"] else "-"
        mixed = "one pass" if row["gathered"] else "per adapter" if row["adapter"] else "-"
        lr = row["options"].get("learning_rate")
        lr_text = "-" if not isinstance(lr, float) else f"{lr:.1e}" + ("*" if row["default_source"].startswith("tuned") else "")
        options = ", ".join(o for o in row["options"] if o != "learning_rate")
        table.add_row(row["method"], row["description"], options, lr_text, merge, mixed)
    console.print(table)
    console.print("merge: `peftlab export --merge` folds the adapter into its base. mixed: how `peftlab serve` runs a "
                  "batch of rows for several adapters: one pass gathers every row's own adapter weights (these "
                  "methods mix with each other; prompt methods on encoders), per adapter runs a pass for each. "
                  "-: a whole model, not an adapter. "
                  "lr: the default learning rate; *: chosen by a recorded tune (docs/benchmarks.md section 3), "
                  "the others provisional (docs/methods.md). `peftlab methods NAME`: options, defaults and search "
                  "space.")


def _show_method(console: Any, row: dict[str, Any]) -> None:
    """One method: its capabilities, each option with its default and description, what `peftlab tune` searches."""
    from rich.table import Table

    from peftlab.config import MethodName
    from peftlab.methods import SEARCH_SPACES
    from peftlab.methods.space import LogFloat

    console.print(f"[bold]{row['method']}[/bold]: {row['description']}")
    if row["adapter"]:
        how = "one gathered pass for every adapter's rows" if row["gathered"] else "one pass per adapter"
        console.print(f"saved as an adapter; mergeable: {'yes' if row['mergeable'] else 'no'}; mixed batches in "
                      f"the server: {how}")
    else:
        console.print("saved as a whole model folder (plain transformers loads it)")
    table = Table(show_header=True)
    for column in ("option", "default", "description"):
        table.add_column(column, overflow="fold")
    for option, default in row["options"].items():
        table.add_row(option, str(default), row["option_help"][option])
    console.print(table)
    console.print(f"default learning rate: {row['default_source']}")
    searched = [f"{p.name} {p.low:g}..{p.high:g} (log)" if isinstance(p, LogFloat) else
                f"{p.name} in {', '.join(map(str, p.choices))}" for p in SEARCH_SPACES[MethodName(row["method"])]]
    console.print(f"`peftlab tune` searches: {'; '.join(searched)}")
    if row["method"] == "peft":
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        types = sorted(str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING)
        console.print(f"peft_type is one of: {', '.join(types)}")


@models_app.command("list")
def models_list() -> None:
    """Show shipped model aliases, where each is cached and its size."""
    from rich.console import Console
    from rich.table import Table

    from peftlab.models import list_models
    from peftlab.report import human_bytes

    table = Table(title="shipped models")
    for column in ("alias", "task", "prepared", "size", "path", "description"):
        table.add_column(column, overflow="fold")
    for row in list_models():
        table.add_row(row["alias"], row["task"], "yes" if row["prepared"] else "no (prepared on first use)",
                      human_bytes(row["size_bytes"]), str(row["path"] or row.get("problem", "")), row["description"])
    Console(width=160).print(table)


@models_app.command("prepare")
def models_prepare(
    alias: Annotated[str, typer.Argument(help="Alias from `peftlab models list`.")],
    force: Annotated[bool, typer.Option(help="Convert again even if cached.")] = False,
) -> None:
    """Convert a shipped model into a cached Hugging Face folder (once)."""
    from peftlab.models import folder_size, prepare_model
    from peftlab.report import human_bytes

    folder = prepare_model(alias, force=force)
    typer.echo(f"{alias}: {folder} ({human_bytes(folder_size(folder))})")


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(help="RUN_DIR/<method> (FFT model or adapter) or a saved folder.")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to classify.")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Texts from a .txt (one per line), .csv/.tsv or .jsonl file.")] = None,
    column: Annotated[str, typer.Option(help="Text column for --file csv/tsv/jsonl.")] = "text",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON lines).")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per forward pass.")] = 32,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write predictions (JSON lines) to this file.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model for an adapter (default: the one it was trained on).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output file.")] = False,
) -> None:
    """Classify texts with a saved model or adapter: label and every class's probability."""
    from peftlab import fsutil
    from peftlab.predict import load_predictor

    items = list(texts or [])
    if file is not None:
        from_file = _read_texts(file, column)
        if not from_file:
            raise DataError(f"--file {file} holds no texts (it is empty or only blank lines)")
        items += from_file
    if not items:
        raise typer.BadParameter("give TEXT arguments or --file", param_hint="TEXTS")
    _check_texts(items)
    if output is not None and output.is_dir():
        raise FilesystemError(f"--output {output} is a folder; give a file path such as {output / 'predictions.jsonl'}")
    if output is not None and output.exists() and not overwrite:
        raise PeftlabError(f"{output} exists; pass --overwrite to replace it")
    if not logger.isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)  # results and errors only: no "preparing the base model" and the like
    predictor = load_predictor(model_dir, base_model=base, batch_size=batch_size)
    rows = predictor.predict_detailed(items)
    if output is not None:
        fsutil.write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        typer.echo(f"{len(rows)} predictions written to {output}")
        return
    for row in rows:
        if as_json:
            typer.echo(json.dumps(row, ensure_ascii=False))
        else:
            probs = "  ".join(f"{k} {v:.3f}" for k, v in row["probabilities"].items())
            typer.echo(f"{row['label']}\t({probs})\t{row['text']}")


def _check_texts(texts: list[str]) -> None:
    """Texts that training would have dropped get no label: empty ones and ones that are not valid Unicode."""
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise DataError(f"text {number} is empty or only whitespace; training drops such texts, so it gets no "
                            f"label. Remove it")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"text {number} is not valid UTF-8 ({text.encode('utf-8', 'backslashreplace')[:60]!r}); "
                            f"re-encode it as UTF-8") from None


def _read_texts(path: Path, column: str) -> list[str]:
    from peftlab.data.loading import detect_format, get_field, read_table

    if not path.is_file():
        raise PeftlabError(f"--file {path} does not exist")
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            line = path.read_bytes()[:exc.start].count(b"\n") + 1
            raise DataError(f"--file {path} is not UTF-8 (invalid byte 0x{path.read_bytes()[exc.start]:02x} on line "
                            f"{line}); re-save it as UTF-8, e.g. `iconv -f cp949 -t utf-8 {path.name} > fixed.txt`") from None
        return [line for line in lines if line.strip()]
    table = read_table(path, detect_format(path, "auto"))
    if column not in table.columns:
        raise PeftlabError(f"{path}: no column {column!r}; columns found: {table.columns}. Pass --column")
    return [str(get_field(r, column)) for r in table.records]


@app.command()
def generate(
    model_dir: Annotated[Path, typer.Argument(help="RUN_DIR/<method> (FFT causal LM or adapter), a saved folder, or a model alias.")],
    prompts: Annotated[list[str], typer.Argument(help="Prompts to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, max=2048, help="Tokens to generate at most.")] = 40,
    sample: Annotated[bool, typer.Option("--sample", help="Sample (seeded) instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature, > 0 (with --sample).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1] (with --sample).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed, set before each prompt (with --sample).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON lines).")] = False,
    base: Annotated[Optional[str], typer.Option(help="Base model for an adapter (default: the one it was trained on).")] = None,
) -> None:
    """Continue prompts with a saved causal LM or adapter (greedy unless --sample)."""
    from peftlab.generate import generate as generate_texts
    from peftlab.generate import generation_settings, load_generator

    if temperature <= 0:
        raise typer.BadParameter(f"must be > 0, got {temperature}", param_hint="--temperature")
    if not 0 < top_p <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {top_p}", param_hint="--top-p")
    generator = load_generator(model_dir, base_model=base)
    texts = generate_texts(generator, prompts, max_new_tokens=max_new_tokens, do_sample=sample,
                           temperature=temperature, top_p=top_p, seed=seed)
    settings = generation_settings(max_new_tokens, sample, temperature, top_p, seed)
    for index, (prompt, text) in enumerate(zip(prompts, texts)):
        if as_json:
            typer.echo(json.dumps({"prompt": prompt, "generation": text, "settings": settings}, ensure_ascii=False))
        else:
            typer.echo(("\n" if index else "") + prompt + text)  # the prompt, then its continuation


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="RUN_DIR/<method> or an adapter folder (LoRA, DoRA, LoHa, AdaLoRA, IA3).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged model.")],
    merge: Annotated[bool, typer.Option("--merge", help="Merge the adapter into its base (peft merge_and_unload).")] = False,
    base: Annotated[Optional[str], typer.Option(help="Base model (default: the one the adapter was trained on).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output folder.")] = False,
) -> None:
    """Save an adapter merged into its base as a plain transformers model folder."""
    from peftlab.export import export_merged

    if not merge:
        raise typer.BadParameter("only merged export exists: pass --merge", param_hint="--merge")
    folder = export_merged(model_dir, output, overwrite=overwrite, base_model=base)
    typer.echo(f"merged model: {folder}")


@app.command()
def serve(
    base: Annotated[str, typer.Option(help="Base model alias or folder, loaded once and shared by every adapter.")],
    adapters: Annotated[Path, typer.Option(help="Folder whose subfolders are adapters (<name>/ or <method>/model/).")],
    host: Annotated[str, typer.Option(help="Interface to listen on; other than loopback it needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    eager: Annotated[bool, typer.Option("--eager/--lazy", help="Load adapters at startup, or on first use.")] = False,
    max_loaded: Annotated[int, typer.Option(min=0, help="Most adapters held in memory (least recently used unload); 0: no limit.")] = 32,
    batch_window_ms: Annotated[float, typer.Option(min=0.0, help="How long a request waits for others to share its forward pass (shorter than --request-timeout).")] = 5.0,
    max_texts: Annotated[int, typer.Option(min=1, help="Texts per request (more: 413).")] = 64,
    max_chars: Annotated[int, typer.Option(min=1, help="Characters per text (more: 422).")] = 4000,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Request body size (more: 413).")] = 1_000_000,
    request_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds a request may wait for its result (then 504).")] = 60.0,
    api_key: Annotated[Optional[str], typer.Option(envvar="PEFTLAB_API_KEY", show_envvar=True, help="Bearer token required on every endpoint but /health, / and /docs (admin load/unload included).")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(help="Host header name accepted besides localhost, 127.0.0.1, ::1 (repeatable; '*' any).")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="Browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable); none by default.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the base model folder's own Python code. Only for folders you trust.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle weights (.bin) for the base model and adapters.")] = False,
) -> None:
    """Serve many adapters on one shared base model over HTTP (docs at /docs, a try-it page at /)."""
    from peftlab.serve.app import ServeLimits
    from peftlab.serve.app import serve as run_server

    limits = ServeLimits(max_texts=max_texts, max_chars=max_chars, max_body_bytes=max_body_bytes,
                         timeout_s=request_timeout)
    run_server(base, adapters, host=host, port=port, eager=eager, max_loaded=max_loaded,
               batch_window_ms=batch_window_ms, limits=limits, api_key=api_key, allowed_hosts=allowed_host or (),
               cors_origins=cors_origin or (), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def main() -> None:
    """Console entry point: run the app, turning peftlab errors into a message and exit code."""
    try:
        # Without standalone mode click returns (not raises) the code of `raise typer.Exit(n)`.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except PeftlabError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except OSError as exc:
        # Any filesystem failure not caught closer to its cause: name the path and the reason, no traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        typer.secho(f"error: {where}{exc.strerror or exc} (check the path, its permissions and free space)",
                    err=True, fg=typer.colors.RED)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun with --resume to continue", err=True)
        sys.exit(130)
    except Exception as exc:
        # Usage errors (unknown flag, missing argument) arrive here in non-standalone mode; typer vendors
        # its own click, so recognise them by their interface rather than by class.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
