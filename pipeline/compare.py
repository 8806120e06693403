"""The paper's method comparison as DVC experiments: one experiment per method, run through the
normal stages, compared from `dvc exp show --json`.

Each method (an objective of `pipeline.objectives`, with each Δ where Δ applies) is a named
experiment `cmp-<objective>[-d<Δ>]` that sets `train.objective` (and `delta`) on top of the
committed params. Only `train`, `generate@policy` and `evaluate` rerun in an experiment; DVC's
run cache restores anything it has seen. A method whose experiment already exists on the
current commit is not queued again, so a second `safedpo compare` recomputes nothing. The queue
runs one experiment at a time (`run_queue`), with a line as each starts and ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline import objectives, paths
from pipeline.artifacts import atomic_path, write_parquet
from pipeline.config import Params, from_dict
from pipeline.errors import UserError
from pipeline.repolock import exclusive

#: Named profiles for `safedpo compare --profile NAME` (package data).
PROFILES = Path(__file__).parent / "profiles"
#: Over-refusal is not among them: it is defined only on prompts labelled "should be answered",
#: which only suites have (`suite_<s>_over_refusal_rate`, among the suite columns).
METRIC_COLUMNS = ["harmless_rate", "helpfulness", "win_rate_vs_sft", "kl_to_ref",
                  "length_stop_rate", "ref_logp_per_token", "pref_accuracy_helpful",
                  "pref_accuracy_safety", "judge_cost_accuracy", "judge_reward_accuracy",
                  "n_prompts"]
#: Metrics shown with their 95% interval (pipeline/support.py).
WITH_CI = ["harmless_rate", "helpfulness", "win_rate_vs_sft", "kl_to_ref",
           "length_stop_rate", "ref_logp_per_token", "pref_accuracy_safety",
           "pref_accuracy_helpful"]
#: The caveats each row carries (from its metrics.json): the metrics resting on fewer than
#: `evaluate.min_support` items, and whether the judge is below its accuracy threshold.
FLAG_COLUMNS = ["low_support", "judge_below_threshold", "judge_cost_balanced_accuracy"]
LOW_MARK = "*"
CI_COLUMNS = [f"{k}_ci_{end}" for k in WITH_CI for end in ("low", "high")]
N_COLUMNS = [f"{k}_n" for k in WITH_CI]
COLUMNS = ["method", "experiment", "objective", "delta", *METRIC_COLUMNS, *CI_COLUMNS,
           *N_COLUMNS, *FLAG_COLUMNS]
#: Per held-out suite (`suite_<s>_<metric>`, pipeline/breakdown.py), with intervals.
SUITE_METRICS = ("harmless_rate", "refusal_prefix_rate", "over_refusal_rate", "helpfulness")
_SUITE_KEY = re.compile(r"^suite_([a-z0-9_]+?)_(" + "|".join(SUITE_METRICS) + r")$")
#: A suite whose prompts come from another domain than the judge's data (pipeline/evaluation.py):
#: its harmless rate is marked in the report.
_OOD_KEY = re.compile(r"^suite_([a-z0-9_]+?)_judge_out_of_distribution$")
OOD_MARK = "†"


def suite_columns(metrics: dict[str, Any]) -> list[str]:
    """The held-out suite metrics an experiment reports, in a stable order."""
    return sorted(k for k in metrics if _SUITE_KEY.match(k))


@dataclass(frozen=True)
class Profile:
    """A named overlay of params.yaml for every experiment of a comparison (`--profile`): a
    model and the sizes that fit it, e.g. `gemma3-270m` (pipeline/profiles/)."""

    name: str
    overrides: tuple[str, ...]  # KEY=VALUE, as `dvc exp run -S` takes them

    @property
    def results_dir(self) -> Path:
        return paths.RESULTS_DIR / self.name


def load_profile(spec: str, params_file: Path = paths.PARAMS) -> Profile:
    """The profile `spec`: a name in pipeline/profiles/ or a YAML file. Its keys are checked
    against params.yaml's schema here, once, so a typo fails before anything is queued."""
    path = PROFILES / f"{spec}.yaml"
    if not path.exists():
        path = Path(spec)
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise UserError(f"--profile {spec!r} is neither a profile ({', '.join(known)}) nor a "
                        "YAML file")
    overlay = yaml.safe_load(path.read_text()) or {}
    if not isinstance(overlay, dict):
        raise UserError("a profile is a mapping of params.yaml keys", path=path)
    base = yaml.safe_load(Path(params_file).read_text()) or {}
    from_dict(Params, _merged(base, overlay))  # validates: one line on a wrong key or value
    return Profile(path.stem, tuple(f"{k}={_hydra(v)}" for k, v in _leaves(overlay)))


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) \
            else v
    return out


def _leaves(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every non-mapping value; a list is one value (suites)."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def _hydra(v: Any) -> str:
    """A value in the override grammar `dvc exp run -S` parses (Hydra's): strings quoted, so
    `builtin:gemma3-270m` stays one string; lists and mappings written out."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_hydra(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_hydra(x)}" for k, x in v.items()) + "}"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Method:
    objective: str
    delta: float
    profile: Profile | None = None

    @property
    def experiment(self) -> str:
        obj = objectives.get(self.objective)
        suffix = f"-d{self.delta:g}".replace(".", "p") if obj.uses_delta else ""
        prefix = f"{self.profile.name}-" if self.profile else ""
        return f"{prefix}cmp-{self.objective}{suffix}".replace("_", "-")

    @property
    def label(self) -> str:
        return objectives.get(self.objective).label(self.delta)

    def set_params(self) -> list[str]:
        out = [a for o in (self.profile.overrides if self.profile else ()) for a in ("-S", o)]
        out += ["-S", f"train.objective={self.objective}"]
        if objectives.get(self.objective).uses_delta:
            out += ["-S", f"delta={self.delta:g}"]
        return out


def methods(names: Sequence[str], deltas: Sequence[float], profile: Profile | None = None
            ) -> list[Method]:
    """One method per objective, and per Δ for the objectives that use Δ."""
    out = []
    for name in names:
        obj = objectives.get(name)
        out += [Method(name, d, profile) for d in deltas] if obj.uses_delta \
            else [Method(name, 0.0, profile)]
    return out


def dvc_command() -> tuple[str, dict[str, str]]:
    """The `dvc` beside this interpreter (else on PATH) and the environment to run it in."""
    # Queue workers run `safedpo` from a temporary copy of the repository: put this
    # interpreter's scripts directory on PATH as an absolute path, so an unactivated
    # `.venv/bin/safedpo compare` works too.
    scripts = os.path.dirname(os.path.abspath(sys.executable))
    env = {**os.environ, "DVC_NO_ANALYTICS": "true",
           "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}
    return shutil.which("dvc", path=env["PATH"]) or "dvc", env


def _dvc(args: list[str], cwd: Path) -> str:
    dvc, env = dvc_command()
    try:
        proc = subprocess.run([dvc, *args], cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("dvc is not on PATH (activate the project's virtualenv)") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"`dvc {' '.join(args)}` failed: {tail[0]}")
    return proc.stdout


def experiment_metrics(shown: list[dict[str, Any]]
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """From the output of `dvc exp show --json`: the metrics of `data/eval/metrics.json` of each
    named experiment of the current commit that succeeded, and the failed ones with their log.

    A failed experiment still shows metrics: the baseline's git-tracked metrics file, copied
    into its workspace. They are not its own, so a failed run must never be read as a result.
    """
    ok: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            executor = exp.get("executor") or {}
            for rev in exp.get("revs") or []:
                name = rev.get("name")
                if not name:
                    continue
                if executor.get("state") == "failed" or rev.get("error"):
                    failed[name] = str((executor.get("local") or {}).get("log") or "")
                    continue
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get(str(paths.EVAL_METRICS), {})
                if metrics.get("data"):
                    ok[name] = metrics["data"]
    return ok, failed


def _git(args: list[str], cwd: Path, check: bool = True) -> str | None:
    """`git args` in `cwd`: its stdout; on failure a one-line error, or None if not `check`."""
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        if not check:
            return None
        raise UserError(f"`git {' '.join(args)}` failed: "
                        f"{(proc.stderr.strip().splitlines() or ['(no output)'])[-1]}; compare "
                        "runs DVC experiments, which need a git repository with a commit")
    return proc.stdout


def baseline_commit(cwd: Path = Path()) -> str:
    return _git(["rev-parse", "--short", "HEAD"], Path(cwd)).strip()


def committed_params_text(cwd: Path = Path()) -> str:
    """params.yaml as committed at HEAD: what every experiment of a comparison starts from."""
    return _git(["show", f"HEAD:{paths.PARAMS.as_posix()}"], Path(cwd))


@contextlib.contextmanager
def committed_params(cwd: Path) -> Iterator[None]:
    """params.yaml as committed while experiments are queued, the user's own put back after.
    `dvc exp run --queue` takes the workspace's params.yaml as it is, so a value an earlier `dvc
    exp run -S delta=5` left there would otherwise run as every method's Δ; each method is to
    run at the values it names over the committed ones."""
    path = Path(cwd) / paths.PARAMS
    mine, committed = path.read_text(encoding="utf-8"), committed_params_text(cwd)
    if mine == committed:
        yield
        return
    print(f"compare: {paths.PARAMS} differs from the commit; the experiments start from the "
          "committed one, and yours is left as it is")
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(committed, encoding="utf-8")
        yield
    finally:
        with atomic_path(path) as tmp:
            tmp.write_text(mine, encoding="utf-8")


def local_inputs(params: Params) -> list[str]:
    """The params that name a file or directory: data set, model, suites, judge models."""
    names = [params.dataset.name, params.model.name, *(s.source for s in params.suites),
             params.judge.reward_model, params.judge.cost_model, params.judge.guard.model]
    return [n for n in names if n and not n.startswith("builtin:")]


def check_inputs_tracked(cwd: Path = Path()) -> None:
    """Refuse, before anything is queued, a local input that neither git nor DVC tracks: a
    queued experiment runs in a copy of the commit, where it is missing (and a missing model
    directory would be read as a hub id)."""
    cwd = Path(cwd)
    params = from_dict(Params, yaml.safe_load(committed_params_text(cwd)) or {})
    for name in local_inputs(params):
        if not (cwd / name).exists():
            continue  # a hub id, or a path the stages refuse with their own line
        dvc_file = f"{name.rstrip('/')}.dvc"
        tracked = _git(["ls-files", "--", name, dvc_file], cwd).split()
        if not tracked:
            raise UserError(
                f"{name} is neither in git nor tracked by DVC, and the queued experiments run in "
                f"a copy of the commit, without it; track it first: `dvc add {name} && git add "
                f"{dvc_file} .gitignore && git commit -m 'track {name}'` (or `git add` a small "
                "file)")


def run_comparison(chosen: Sequence[Method], cwd: Path = Path()) -> pd.DataFrame:
    """Queue the methods that have no experiment yet, run them, and tabulate every method.

    Queueing writes each method's params into the workspace's params.yaml for a moment (DVC
    stashes them), so it holds the project (`repolock.exclusive`): refused while `dvc repro`
    or a stage runs here. The queued runs then go in DVC's temporary copies, not here."""
    with exclusive("safedpo compare", Path(cwd)):
        have, failed = experiment_metrics(json.loads(_dvc(["exp", "show", "--json"], cwd)))
        todo = [m for m in chosen if m.experiment not in have]
        stale = [m.experiment for m in todo if m.experiment in failed]
        if stale:  # a failed run of an earlier call: run it again
            _dvc(["exp", "remove", *stale], cwd)
        check_inputs_tracked(Path(cwd))
        print(f"compare: baseline commit {baseline_commit(cwd)} (its params.yaml, each method's "
              "values on top)")
        with committed_params(Path(cwd)):
            for m in todo:
                _dvc(["exp", "run", "--queue", "-n", m.experiment, *m.set_params()], cwd)
                print(f"compare: queued {m.experiment} ({m.label})")
    if todo:
        # Which ones failed is read from `exp show` below.
        run_queue([m.experiment for m in todo], cwd)
        have, failed = experiment_metrics(json.loads(_dvc(["exp", "show", "--json"], cwd)))
    missing = [m.experiment for m in chosen if m.experiment not in have]
    if missing:
        logs = "; ".join(f"{n}: {failed.get(n) or 'no metrics'}" for n in missing)
        raise UserError(f"experiment(s) {missing} failed ({logs}); see `dvc queue logs NAME`")
    print(f"compare: {len(todo)} experiment(s) run, {len(chosen) - len(todo)} reused")
    return table(chosen, have)


#: `dvc exp run --run-all` follows each queued experiment's log in turn; each begins so.
_STARTS = re.compile(r"^Reproducing experiment '(?P<name>[^']+)'")
#: The line that says why a stage failed: the pipeline's own (`safedpo: error: ...`), else
#: DVC's first.
_ERRORS = (re.compile(r"^safedpo: error: "), re.compile(r"^ERROR: "))
#: Shown as each experiment ends.
HEADLINE = ("harmless_rate", "helpfulness")


def _duration(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{sec}s"


def _error_line(lines: Sequence[str]) -> str | None:
    for pattern in _ERRORS:
        hit = next((ln for ln in lines if pattern.match(ln)), None)
        if hit is not None:
            return hit
    return None


def _result_metrics(name: str, cwd: Path) -> dict[str, Any] | None:
    """The evaluate metrics a finished experiment committed (its DVC ref on this commit's
    baseline, `refs/exps/<sha[:2]>/<sha[2:]>/<name>`), or None if it left none. Read with git,
    which takes no DVC lock while the queue runs."""
    head = (_git(["rev-parse", "HEAD"], cwd, check=False) or "").strip()
    shown = _git(["show", f"refs/exps/{head[:2]}/{head[2:]}/{name}:{paths.EVAL_METRICS}"],
                 cwd, check=False) if head else None
    if shown is None:
        return None
    try:
        return json.loads(shown)
    except json.JSONDecodeError:
        return None


def run_queue(names: Sequence[str], cwd: Path = Path()) -> None:
    """Run the queued experiments one at a time (`dvc exp run --run-all -j 1`) and say, as it
    goes, which one started, and as each ends its wall-clock time and its headline metrics,
    or the line of its log that says why it failed; then the total. Which experiments
    succeeded is decided by the caller from `dvc exp show`, not from these lines."""
    print(f"compare: running {len(names)} queued experiment(s) one at a time; "
          "`dvc queue status` lists them, `dvc queue logs NAME` prints one's log")
    dvc, env = dvc_command()
    t0 = time.monotonic()
    ok = 0
    current: str | None = None
    started = t0
    lines: list[str] = []

    def finish() -> None:
        nonlocal ok
        took = _duration(time.monotonic() - started)
        error = _error_line(lines)
        metrics = None if error else _result_metrics(str(current), cwd)
        if metrics is not None:
            ok += 1
            got = ", ".join(f"{k} {metrics[k]:.3f}" for k in HEADLINE
                            if isinstance(metrics.get(k), int | float))
            print(f"compare: {current} done in {took}: {got or 'no headline metric'}")
        else:
            print(f"compare: {current} failed after {took}: {error or 'no metrics written'} "
                  f"(`dvc queue logs {current}`)")

    # Unbuffered: each line of the followed logs arrives as it is written.
    proc = subprocess.Popen([dvc, "exp", "run", "--run-all", "-j", "1"], cwd=cwd,
                            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip()
        start = _STARTS.match(line)
        if start:
            if current is not None:
                finish()
            current, started, lines = start["name"], time.monotonic(), []
            place = f"{names.index(current) + 1} of {len(names)}" if current in names \
                else "queued before"
            print(f"compare: {current} started ({place})")
        elif current is not None:
            lines.append(line)
    proc.wait()
    if current is not None:
        finish()
    print(f"compare: {ok} of {len(names)} experiment(s) succeeded in "
          f"{_duration(time.monotonic() - t0)}")


def table(chosen: Sequence[Method], metrics: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per method plus the SFT baseline (its numbers are in every experiment)."""
    first = metrics[chosen[0].experiment]
    rows = [{"method": "SFT", "experiment": "", "objective": "", "delta": float("nan"),
             "harmless_rate": first.get("harmless_rate_sft"),
             "helpfulness": first.get("helpfulness_sft"), "win_rate_vs_sft": 0.5,
             "kl_to_ref": 0.0,
             "length_stop_rate": first.get("length_stop_rate_sft"),
             "ref_logp_per_token": first.get("ref_logp_per_token_sft"),
             "judge_cost_accuracy": first.get("judge_cost_accuracy"),
             "judge_reward_accuracy": first.get("judge_reward_accuracy"),
             "n_prompts": first.get("n_prompts"),
             **{f"{k}_ci_{end}": first.get(f"{k}_sft_ci_{end}") for k in WITH_CI
                if k != "win_rate_vs_sft" for end in ("low", "high")},
             **{f"{k}_n": first.get(f"{k}_sft_n") for k in WITH_CI},
             "low_support": _low_support(first, sft=True),
             "judge_below_threshold": bool(first.get("judge_below_threshold")),
             "judge_cost_balanced_accuracy": first.get("judge_cost_balanced_accuracy")}]
    held = suite_columns(first)
    held_ci = [f"{k}_ci_{end}" for k in held for end in ("low", "high")]
    ood = sorted(k for k in first if _OOD_KEY.match(k))
    rows[0].update({k: first.get(k) for k in ood})
    rows[0].update({k: first.get(f"{k}_sft") for k in held})
    rows[0].update({f"{k}_ci_{end}": first.get(f"{k}_sft_ci_{end}") for k in held
                    for end in ("low", "high")})
    for m in chosen:
        got = metrics[m.experiment]
        delta = m.delta if objectives.get(m.objective).uses_delta else float("nan")
        rows.append({"method": m.label, "experiment": m.experiment, "objective": m.objective,
                     "delta": delta,
                     **{k: got.get(k) for k in METRIC_COLUMNS + CI_COLUMNS + N_COLUMNS + held
                        + held_ci + ood},
                     "low_support": _low_support(got, sft=False),
                     "judge_below_threshold": bool(got.get("judge_below_threshold")),
                     "judge_cost_balanced_accuracy": got.get("judge_cost_balanced_accuracy")})
    numeric = METRIC_COLUMNS + CI_COLUMNS + held + held_ci
    df = pd.DataFrame(rows, columns=COLUMNS + held + held_ci + ood)
    df[numeric] = df[numeric].astype(float)
    return df


def _low_support(metrics: dict[str, Any], sft: bool) -> str:
    """The row's metrics under `evaluate.min_support` (the SFT row's are the `_sft` keys)."""
    keys = [k for k in str(metrics.get("low_support") or "").split(",") if k]
    if sft:
        return ",".join(k.removesuffix("_sft") for k in keys if k.endswith("_sft"))
    return ",".join(k for k in keys if not k.endswith("_sft"))


def over_refusal_columns(df: pd.DataFrame) -> dict[str, str]:
    """Column -> suite, for the over-refusal rate of every suite with prompts labelled "should
    be answered" (`suite_<s>_over_refusal_rate`): the only over-refusal there is."""
    return {c: m[1] for c in df.columns
            if (m := _SUITE_KEY.match(c)) and m[2] == "over_refusal_rate"}


def _thin_mark(r: dict[str, Any], k: str) -> str:
    """` * n=N` where row `r`'s metric `k` rests on fewer items than min_support, else ""."""
    if k not in str(r.get("low_support") or "").split(","):
        return ""
    n = r.get(f"{k}_n")
    return f" {LOW_MARK} n={int(n)}" if n is not None and not pd.isna(n) else f" {LOW_MARK}"


def _judge_below(df: pd.DataFrame) -> bool:
    return "judge_below_threshold" in df and bool(df["judge_below_threshold"].fillna(False).any())


def to_markdown(df: pd.DataFrame) -> str:
    over = over_refusal_columns(df)
    head = ["method", "harmless", "helpfulness", "win vs SFT",
            *[f"over-refusal ({suite} suite)" for suite in over.values()],
            "KL to ref", "hit max_new_tokens", "ref log-prob / token", "safety pref. acc."]
    keys = ["harmless_rate", "helpfulness", "win_rate_vs_sft", *over, "kl_to_ref",
            "length_stop_rate", "ref_logp_per_token", "pref_accuracy_safety"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(r: dict[str, Any], k: str) -> str:
        if pd.isna(r[k]):
            return "–"
        low, high = r.get(f"{k}_ci_low"), r.get(f"{k}_ci_high")
        ci = "" if low is None or pd.isna(low) else f" [{low:.2f}, {high:.2f}]"
        return f"{r[k]:.3f}{ci}{_thin_mark(r, k)}"

    for r in df.to_dict("records"):
        lines.append(f"| {r['method']} | " + " | ".join(cell(r, k) for k in keys) + " |")
    # The over-refusal rates are in the first table already.
    held = [c for c in df.columns if _SUITE_KEY.match(c) and c not in over]
    if held:
        parts = [_SUITE_KEY.match(c) for c in held]
        names = [f"{m[1]}: {m[2].replace('_', ' ')}"
                 + (f" {OOD_MARK}" if m[2] == "harmless_rate" and _out_of_distribution(df, m[1])
                    else "") for m in parts if m]
        lines += ["", "Held-out prompt suites (prompts never seen in training):", "",
                  "| " + " | ".join(["method", *names]) + " |", "|" + "---|" * (len(held) + 1)]
        for r in df.to_dict("records"):
            lines.append(f"| {r['method']} | " + " | ".join(cell(r, k) for k in held) + " |")
        if any(OOD_MARK in n for n in names):
            lines += ["", f"{OOD_MARK} Out of the judge's distribution: the suite comes from "
                          "another domain than the data the judge was trained and measured on, "
                          "so the judge's accuracy below says nothing about it; read the "
                          "refusal-prefix rate (the AdvBench/GCG rule) beside it."]
    r0 = df.iloc[0]
    below = " — **below the threshold**: its harmless rates say little" \
        if _judge_below(df) else ""
    balanced = r0.judge_cost_balanced_accuracy
    lines += ["", f"Judges (held-out test pairs): cost accuracy {r0.judge_cost_accuracy:.3f}"
                  + (f" (balanced {balanced:.3f})" if balanced is not None
                     and not pd.isna(balanced) else "")
                  + f"{below}, reward accuracy {r0.judge_reward_accuracy:.3f}; "
                  f"{int(r0.n_prompts)} prompts. "
                  "Brackets: 95% intervals (Wilson for rates, bootstrap over prompts for means "
                  f"and the win rate). {LOW_MARK} n=…: rests on fewer items than "
                  "evaluate.min_support (flagged `low_support` in metrics.json)."]
    return "\n".join(lines) + "\n"


def _out_of_distribution(df: pd.DataFrame, suite: str) -> bool:
    col = f"suite_{suite}_judge_out_of_distribution"
    return col in df and bool(df[col].fillna(False).astype(bool).any())


def write_results(df: pd.DataFrame, out_dir: Path = paths.RESULTS_DIR) -> None:
    out_dir = Path(out_dir)
    write_parquet(df, out_dir / paths.RESULTS_TABLE.name)
    with atomic_path(out_dir / paths.RESULTS_MARKDOWN.name) as tmp:
        tmp.write_text(to_markdown(df))
    plot_tradeoff(df, out_dir / paths.RESULTS_PLOT.name)


def plot_tradeoff(df: pd.DataFrame, dest: Path) -> None:
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(df)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def tradeoff_figure(df: pd.DataFrame) -> Any:
    """Harmless rate against helpfulness, one point per method with its 95% intervals as error
    bars; a point resting on fewer items than `min_support` is hollow and its label says n, and
    a judge below its accuracy threshold is named in the title (the caveats of the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def err(r: dict[str, Any], k: str) -> list[list[float]] | None:
        low, high = r.get(f"{k}_ci_low"), r.get(f"{k}_ci_high")
        if low is None or high is None or pd.isna(low) or pd.isna(high):
            return None
        return [[max(r[k] - low, 0.0)], [max(high - r[k], 0.0)]]

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in df.to_dict("records"):
        marks = "".join(_thin_mark(r, k) for k in ("harmless_rate", "helpfulness"))
        points = ax.errorbar(r["helpfulness"], r["harmless_rate"], xerr=err(r, "helpfulness"),
                             yerr=err(r, "harmless_rate"), fmt="o", ms=7, capsize=3,
                             mfc="none" if marks else None)
        ax.annotate(r["method"] + marks, (r["helpfulness"], r["harmless_rate"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=9,
                    color=points[0].get_color())
    ax.set_xlabel("helpfulness (mean judge reward)")
    ax.set_ylabel("harmless rate (judge cost <= 0)")
    ax.set_title("Safety vs helpfulness, one DVC experiment per method (95% intervals)"
                 + ("\njudge below its accuracy threshold: the harmless rates say little"
                    if _judge_below(df) else ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
