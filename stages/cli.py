"""The `safedpo` command line: one command per DVC stage, plus `inspect` and `theory`.

Stage modules are imported inside each command so that `safedpo --help` and `safedpo inspect`
do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import resource
import sys
import time
from pathlib import Path

import typer

from pipeline.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SafeDPO pipeline. Each command is one DVC stage (see dvc.yaml).")

PARAMS_OPT = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameter file.")

STAGES = {
    "source": "Write the content keys of dataset.name and model.name (always runs; no download).",
    "download": "Fetch the data set named by dataset.name into data/raw/.",
    "normalize": "Map raw rows to the pairs schema; write data/pairs/ and report.json.",
    "sft": "Supervised fine-tuning (or pass-through); write data/sft/.",
    "ref_logps": "Precompute reference log-probs of every response; write data/ref_logps/.",
    "train": "Preference training (train.objective); write data/policy/ and dvclive/.",
    "suites": "Read the held-out prompt suites (params `suites`); write data/suites/.",
    "judge": "Train the offline judges or point at hub score models; write data/judge/.",
    "evaluate": "Score generations; write data/eval/metrics.json and scores.parquet.",
    "theory": "Tabular check that SafeDPO reaches the closed-form safe optimum.",
}


def _run_stage(module: str, **kwargs: object) -> None:
    start = time.perf_counter()
    mod = importlib.import_module(f"stages.{module}")
    mod.run(**kwargs)
    # What a user sizes a machine by, in the log only (never in a cached out).
    print(f"{module}{' ' + str(kwargs['tag']) if 'tag' in kwargs else ''}: "
          f"{time.perf_counter() - start:.0f}s wall, {peak_memory()}")


def peak_memory() -> str:
    """This process's peak resident memory, and the GPU's peak allocation where one was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_gib = rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes there, KiB here
    out = f"peak memory {rss_gib:.1f} GiB"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out += f", GPU {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return out


def _register(name: str, help_text: str) -> None:
    def command(params: Path = PARAMS_OPT) -> None:
        _run_stage(name, params_file=params)

    command.__name__ = name
    app.command(name=name.replace("_", "-"), help=help_text)(command)


for _name, _help in STAGES.items():
    _register(_name, _help)


@app.command(help="Generate responses of one model (sft or policy) to the test prompts.")
def generate(
    model: str = typer.Argument(..., help="Model tag: sft or policy."),
    params: Path = PARAMS_OPT,
) -> None:
    _run_stage("generate", params_file=params, tag=model)


@app.command(help="The paper's method comparison as DVC experiments: one experiment per "
                  "objective (and per Δ for SafeDPO), queued and run with `dvc exp`, reused "
                  "when it exists; writes data/results/{results.md,results.parquet,tradeoff.png}.")
def compare(
    objective: list[str] = typer.Option(None, "--objective", "-o",
                                        help="Objectives to compare (default: all)."),
    delta: list[float] = typer.Option(None, "--delta", "-d",
                                      help="Δ values for SafeDPO (default: 0 and params' delta)."),
    profile: str = typer.Option(None, "--profile",
                                help="A params overlay for every experiment: a name in "
                                     "pipeline/profiles/ (gemma3-270m) or a YAML file; results "
                                     "go to data/results/<profile>/."),
    params: Path = PARAMS_OPT,
) -> None:
    from pipeline import objectives
    from pipeline.compare import load_profile, methods, run_comparison, to_markdown, write_results
    from pipeline.config import load_params

    deltas = delta or sorted({0.0, load_params(params).delta})
    prof = load_profile(profile, params) if profile else None
    table = run_comparison(methods(objective or list(objectives.OBJECTIVES), deltas, prof))
    if prof is None:
        write_results(table)
    else:
        write_results(table, prof.results_dir)
    typer.echo(to_markdown(table))


@app.command(help="Print a Parquet artifact's schema, row count, key statistics and first rows.")
def inspect(
    path: Path = typer.Argument(..., help="A Parquet file, e.g. data/pairs/train.parquet."),
    rows: int = typer.Option(5, "--rows", "-n", help="How many rows to show."),
) -> None:
    from pipeline.inspect import describe

    typer.echo(describe(path, rows=rows))


VERBOSE = ("-v", "--verbose")


def main() -> None:
    """Entry point: a `UserError` becomes one line on stderr and exit code 2; anything
    unexpected one line and exit code 1 (`-v`/`--verbose`, anywhere: the traceback)."""
    verbose = any(a in VERBOSE for a in sys.argv[1:])
    try:
        app(args=[a for a in sys.argv[1:] if a not in VERBOSE], standalone_mode=False)
    except UserError as exc:
        print(f"safedpo: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("safedpo: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if verbose:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"safedpo: unexpected error: {type(exc).__name__}: {first}; rerun with -v for the "
              "traceback", file=sys.stderr)
        sys.exit(1)
