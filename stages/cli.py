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
    from pipeline.repolock import stage_lock

    start = time.perf_counter()
    mod = importlib.import_module(f"stages.{module}")
    with stage_lock():  # `safedpo compare` does not rewrite params.yaml under a running stage
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
                                      help="Δ values for SafeDPO (default: 0 and the "
                                           "committed delta)."),
    profile: str = typer.Option(None, "--profile",
                                help="A params overlay for every experiment: a name in "
                                     "pipeline/profiles/ (gemma3-270m) or a YAML file; results "
                                     "go to data/results/<profile>/."),
    params: Path = PARAMS_OPT,
) -> None:
    import yaml

    from pipeline import objectives
    from pipeline.compare import (
        committed_params_text,
        load_profile,
        methods,
        run_comparison,
        to_markdown,
        write_results,
    )
    from pipeline.config import load_params

    if delta:
        deltas = delta
    else:  # the committed Δ (and 0): a `dvc exp run -S delta=5` leaves its value in the file
        committed = yaml.safe_load(committed_params_text()) or {}
        deltas = sorted({0.0, float(committed.get("delta", load_params(params).delta))})
    prof = load_profile(profile, params) if profile else None
    table = run_comparison(methods(objective or list(objectives.OBJECTIVES), deltas, prof))
    if prof is None:
        write_results(table)
    else:
        write_results(table, prof.results_dir)
    typer.echo(to_markdown(table))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             help="`dvc status` that sees in-place edits of a local dataset.name or model.name: "
                  "first writes their content keys (what the always-run `source` stage writes; "
                  "the same bytes if nothing changed), then runs `dvc status ARGS`.")
def status(ctx: typer.Context, params: Path = PARAMS_OPT) -> None:
    import subprocess

    from pipeline.compare import dvc_command

    _run_stage("source", params_file=params)
    dvc, env = dvc_command()
    try:
        code = subprocess.run([dvc, "status", *ctx.args], env=env).returncode
    except FileNotFoundError:
        raise UserError("dvc is not on PATH (activate the project's virtualenv)") from None
    if code:
        raise typer.Exit(code)


@app.command(help="Print a Parquet artifact's schema, row count, key statistics and first rows.")
def inspect(
    path: Path = typer.Argument(..., help="A Parquet file, e.g. data/pairs/train.parquet."),
    rows: int = typer.Option(5, "--rows", "-n", help="How many rows to show."),
) -> None:
    from pipeline.inspect import describe

    typer.echo(describe(path, rows=rows))


VERBOSE = ("-v", "--verbose")


INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
TERMINATED = 143  # 128 + SIGTERM


class _Terminated(BaseException):
    """SIGTERM (a scheduler's preemption, `kill`), raised where the process is, so that the
    `finally` blocks of the atomic writes remove their temporary files as on Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


class _Stderr:
    """sys.stderr, remembering whether its last text ended a line: a progress bar cut short by
    an error or a signal ends without one, and the error's line would run on after it."""

    def __init__(self, stream: object) -> None:
        self.stream = stream
        self.mid_line = False

    def write(self, text: str) -> int:
        # Noted before the write: a signal arriving just after it would skip the note.
        if text:
            self.mid_line = not text.endswith("\n")
        return self.stream.write(text)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


def _say(message: str) -> None:
    """`message` on a line of its own on stderr."""
    start = "\n" if isinstance(sys.stderr, _Stderr) and sys.stderr.mid_line else ""
    print(start + message, file=sys.stderr)


def main() -> None:
    """Entry point: a `UserError` becomes one line on stderr and exit code 2; anything
    unexpected one line and exit code 1 (`-v`/`--verbose`, anywhere: the traceback); Ctrl-C
    (SIGINT) one line and 130, SIGTERM one line and 143."""
    import signal

    verbose = any(a in VERBOSE for a in sys.argv[1:])
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    stderr, sys.stderr = sys.stderr, _Stderr(sys.stderr)
    try:
        _main(verbose)
    finally:
        sys.stderr = stderr


def _main(verbose: bool) -> None:
    try:
        code = app(args=[a for a in sys.argv[1:] if a not in VERBOSE], standalone_mode=False)
    except UserError as exc:
        _say(f"safedpo: error: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        _say("safedpo: interrupted")
        sys.exit(INTERRUPTED)
    except _Terminated:
        _say("safedpo: terminated")
        sys.exit(TERMINATED)
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
        _say(f"safedpo: unexpected error: {type(exc).__name__}: {first}; rerun with -v for the "
             "traceback")
        sys.exit(1)
    # Without standalone mode typer *returns* the exit code of a `typer.Exit`, and turns a
    # KeyboardInterrupt into `Exit(130)`: dropped, a Ctrl-C at any point exited 0, silently.
    if code == INTERRUPTED:
        _say("safedpo: interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)
