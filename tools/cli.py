"""`mm1`: one entry point, thin subcommands over library functions (which the tests call directly).

Its flags are frozen by tests/tools/test_cli.py: add one only deliberately. Each subcommand imports
its library when it runs (CLI start-up: `mm1 --help` stays under 0.5 s). The exit statuses of every
command are tools/errors.py's (`EXIT_CODES`, printed by `mm1 --help`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from tools.errors import (EXIT_CODES, EXIT_DAMAGED, EXIT_EMPTY, EXIT_INPUT, EXIT_INTERRUPTED, kept_nothing,
                          missing_extra, retry_kept_nothing)


def _curate(args: argparse.Namespace) -> int:
    # CLI start-up: each command loads its library when it runs (module docstring)
    from curate.contract import Manifest, location
    from curate.recipe import load_recipe
    from curate.recipe_io import parse_override
    from curate.storage import is_url
    from curate.engine.retry import RetryError, retry_failed
    from curate.engine.driver import ResumeError, run_recipe
    from curate.engine.cluster import WorkerEnvironmentError

    if args.retry_failed and args.restart:
        print("mm1 curate: --retry-failed and --restart exclude each other", file=sys.stderr)
        return EXIT_INPUT
    overrides = dict(parse_override(o) for o in args.override)
    if args.output:
        overrides["output.path"] = args.output
    if args.address:
        overrides["cluster.address"] = args.address
    if args.workers:
        overrides["cluster.n_workers"] = args.workers
    recipe = load_recipe(args.recipe, overrides)
    if args.limit is not None:
        if args.limit < 1:
            print(f"mm1 curate: --limit {args.limit}: give a number of inputs, 1 or more", file=sys.stderr)
            return EXIT_INPUT
        recipe = recipe.limited(args.limit)
        print(f"dry run: the first {args.limit} inputs of each source -> {recipe.output.path}")
    out = location(recipe.output.path)
    if not is_url(out) and out.exists() and not out.is_dir():
        print(f"mm1 curate: output.path {out.resolve()} is a file, not a folder: name a new folder "
              "(or an earlier run's output) in the recipe or with --output", file=sys.stderr)
        return EXIT_INPUT
    try:
        if args.retry_failed:
            manifest = Manifest.from_dict(retry_failed(recipe, progress=not args.no_progress))
        else:
            manifest = Manifest.from_dict(run_recipe(recipe, restart=args.restart, progress=not args.no_progress))
    except (ResumeError, RetryError, WorkerEnvironmentError) as exc:  # WorkerEnvironmentError: exit 2, an environment problem
        print(f"mm1 curate: {exc}", file=sys.stderr)
        return EXIT_INPUT
    c = manifest.counts
    print(f"curated {c['inputs']} inputs: {c['kept']} kept, {c['dropped']} dropped -> {out}")
    for r in (manifest.retries or [])[-1:] if args.retry_failed else []:
        print(f"  retry round {r['round']}: {r['retried']} retried, {r['recovered']} recovered, "
              f"{r['failed_again']} failed again (transient), {r['dropped']} dropped for other reasons, "
              f"{r['withdrawn']} shipped samples withdrawn")
    for kind, entry in manifest.kinds.items():
        withdrawn = len(entry.withdrawn or ())
        print(f"  {kind}: {entry.count} samples in {len(entry.shards)} shards"
              + (f" ({withdrawn} withdrawn)" if withdrawn else ""))
    print(f"  manifest: {out / 'manifest.json'}\n  ledger:   {out / 'ledger'}")
    # a retry round is judged on the rows it retried; a run on every input of the output
    problems = (retry_kept_nothing(manifest.retries[-1]) if args.retry_failed and manifest.retries
                else [] if args.retry_failed else kept_nothing(out, manifest.recipe or {}))
    for problem in problems:
        print(f"mm1 curate: {'warning: ' if args.allow_empty else ''}{problem}", file=sys.stderr)
    if problems and not args.allow_empty:
        print("mm1 curate: check the stage's settings and inputs (`mm1 stats` lists every drop reason); "
              "--allow-empty accepts a run that keeps nothing", file=sys.stderr)
        return EXIT_EMPTY
    return 0


def _stats(args: argparse.Namespace) -> int:
    from tools.stats import compute_stats, format_stats  # CLI start-up: loaded when this command runs

    stats = compute_stats(args.out)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats, top_domains=args.top_domains))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tools.verify import verify  # CLI start-up: loaded when this command runs

    report = verify(args.out)
    for err in report.errors:
        print(f"FAIL {err}")
    summary = ", ".join(f"{k}={v}" for k, v in report.checked.items())
    print(f"{'OK' if report.ok else 'FAILED'}: {args.out} ({summary})")
    return 0 if report.ok else EXIT_DAMAGED


def _train(args: argparse.Namespace) -> int:
    # CLI start-up, and the train extra (torch): loaded when this command runs
    from train.recipe import RecipeError, load_train_recipe, parse_override

    try:
        overrides = dict(parse_override(o) for o in args.override)
        if args.steps is not None:
            overrides["steps"] = args.steps
        recipe = load_train_recipe(args.recipe, overrides)
    except RecipeError as exc:
        print(f"mm1 train: {exc}", file=sys.stderr)
        return EXIT_INPUT
    run_dir = Path(args.run_dir or Path("runs") / recipe.name)
    # the trainer (torch's distributed and compile modules, ~2 s) after the recipe: a bad recipe fails fast
    from train.trainer import Diverged, StartError, train

    try:
        final = train(recipe, run_dir, overrides=overrides)
    except Diverged as exc:
        print(f"mm1 train: {exc}", file=sys.stderr)
        return exc.exit_code
    except StartError as exc:
        print(f"mm1 train: {exc}", file=sys.stderr)
        return EXIT_INPUT
    print(f"trained {recipe.name} to step {final['step']}: loss {final['loss']:.4f}, "
          f"{final['skipped']} steps skipped -> {run_dir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tools.report import build_report  # CLI start-up: loaded when this command runs

    path = build_report(args.out, args.output, samples=args.samples, seed=args.seed)
    print(f"report: {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch  # the train extra: loaded only when this command runs (CLI start-up)

    from train.checkpoint import CheckpointError  # CLI start-up, and torch: loaded when this command runs
    from train.export import export_checkpoint

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    try:
        summary = export_checkpoint(Path(args.checkpoint), Path(args.out), hf_decoder=not args.no_hf, dtype=dtype)
    except (CheckpointError, ValueError) as exc:
        print(f"mm1 export: {exc}", file=sys.stderr)
        return EXIT_INPUT
    hf = summary["decoder_hf"] or f"no decoder_hf/ ({summary['decoder_hf_skipped']})"
    print(f"exported {summary['registry_name']} step {summary['step']} from {summary['checkpoint']}: "
          f"{summary['params'] / 1e6:.1f}M parameters, {summary['bytes'] / 2**20:.1f} MiB -> {summary['model']}; {hf}")
    return 0


def _reference(args: argparse.Namespace) -> int:
    from tools.reference import find, format_text  # CLI start-up: loaded when this command runs

    if args.kind is not None:
        try:
            find(args.command, args.kind)
        except KeyError as exc:
            return _input_error(args, exc.args[0])
    print(format_text(args.command, args.kind))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tools.demo.run import run_demo  # CLI start-up: loaded when this command runs

    run_demo(Path(args.dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm1", description=__doc__.splitlines()[0], epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, the libraries' INFO lines, and tracebacks of exit-2 errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("curate", help="run a curation recipe (resumes unfinished work)")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--restart", action="store_true", help="discard an earlier run in the output and start over")
    p.add_argument("--retry-failed", action="store_true",
                   help="fetch again only what a finished run dropped for a transient reason "
                        "(timeouts, connection errors, 429, 5xx); recovered samples go into new shards")
    p.add_argument("--output", help="override output.path")
    p.add_argument("--address", help="override cluster.address: a running Dask scheduler")
    p.add_argument("--workers", type=int, help="override cluster.n_workers (LocalCluster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--allow-empty", action="store_true",
                   help="a run that keeps nothing of a kind it had inputs for: warn and exit 0, not 5")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set a recipe key, e.g. stages.0.image_size=384 (repeatable; the value is read as YAML)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="a dry run: the first N inputs of each source, into OUTPUT.limit-N")
    p.set_defaults(func=_curate)

    p = sub.add_parser("stats", help="statistics of a curated output (sidecars + ledger only)")
    p.add_argument("out")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--top-domains", type=int, default=20, metavar="N",
                   help="rows of the Domains table (download DNS and connections; the manifest keeps 100)")
    p.set_defaults(func=_stats)

    p = sub.add_parser("verify", help="re-read every shard and check it against manifest and ledger")
    p.add_argument("out")
    p.set_defaults(func=_verify)

    p = sub.add_parser("report", help="one self-contained HTML report of an output (two: side by side)")
    p.add_argument("out", nargs="+", metavar="OUT", help="a curated output; a second one to compare with")
    p.add_argument("-o", "--output", help="where the HTML goes (default: OUT/report.html)")
    p.add_argument("--samples", type=int, default=12, help="random kept samples shown per kind")
    p.add_argument("--seed", type=int, default=0, help="which samples")
    p.set_defaults(func=_report)

    p = sub.add_parser("train", help="train MM1 from a training recipe (torchrun for several ranks; resumes)")
    p.add_argument("recipe", help="training recipe YAML")
    p.add_argument("--run-dir", help="checkpoints and metrics (default: runs/<recipe name>)")
    p.add_argument("--steps", type=int, help="override steps")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set a recipe key, e.g. optim.lr=1e-4 (repeatable; the value is read as YAML)")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="a training checkpoint -> model.safetensors + config.json (+ decoder_hf/)")
    p.add_argument("checkpoint", help="a checkpoint folder (step-NNNNNNNN), or a run folder for its newest one")
    p.add_argument("out", help="the export folder")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="cast the weights (default: as stored, fp32)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face decoder folder")
    p.set_defaults(func=_export)

    for which in ("sources", "stages"):
        p = sub.add_parser(which, help=f"every {which[:-1]} kind a recipe may use, with its options and defaults")
        p.add_argument("kind", nargs="?", help=f"one {which[:-1]} kind, shown in full")
        p.set_defaults(func=_reference)

    p = sub.add_parser("demo", help="build the demo inputs, curate them, print stats and verify")
    p.add_argument("--dir", default="demo_out", help="where inputs and outputs go")
    p.set_defaults(func=_demo)
    return parser


RESUME = {
    "curate": "run `mm1 curate RECIPE` again to resume where it stopped",
    "train": "run the same command again to resume from the newest checkpoint",
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status (`EXIT_CODES`): user-caused errors are one line on stderr."""
    args = build_parser().parse_args(argv)
    _SIGINT["command"] = args.command
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,  # WARNING: open_clip's root-logger INFO lines
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    for ours in ("mm1", "curate", "train", "tools"):  # this project's INFO lines stay
        logging.getLogger(ours).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("distributed", "tornado", "bokeh"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.ERROR)
        if not args.verbose and "distributed" not in sys.modules:
            # distributed sets these loggers' levels from dask's config when it is imported, in this
            # process and in the worker processes it starts (which inherit the environment)
            os.environ.setdefault(f"DASK_LOGGING__{noisy.upper()}", "error")
    # CLI start-up: after parsing, so `mm1 --help` and a usage error stay fast (pydantic, 0.1 s)
    from curate.recipe_io import RecipeError

    try:
        return args.func(args)
    except (RecipeError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        return _input_error(args, str(exc))
    except ModuleNotFoundError as exc:
        if (message := missing_extra(exc, args.command)) is None:
            raise
        return _input_error(args, message)
    except KeyboardInterrupt:
        print(_interrupted(args.command), file=sys.stderr)
        return EXIT_INTERRUPTED


def _input_error(args: argparse.Namespace, message: str) -> int:
    """A recipe, input or environment problem: its message (and with -v, its traceback)."""
    if args.verbose:
        traceback.print_exc()
    print(f"mm1 {args.command}: {message}", file=sys.stderr)
    return EXIT_INPUT


_SIGINT: dict[str, Any] = {"pressed": False, "command": "mm1"}  # what `_on_sigint` knows


def _interrupted(command: str) -> str:
    return f"\nmm1 {command}: interrupted; " + RESUME.get(command, "run the same command again")


def _on_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C: the first raises KeyboardInterrupt (the command stops as it would by default); a
    second leaves at once (os._exit 130), whatever the first is still waiting on: cleanup after a
    KeyboardInterrupt may block (a Dask client closing a connection that never opened) and
    swallow later ones (seen under load: test_ctrl_c_exits_130_saying_how_to_resume)."""
    if _SIGINT["pressed"]:
        sys.stderr.write(_interrupted(_SIGINT["command"]) + "\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    _SIGINT["pressed"] = True
    raise KeyboardInterrupt


def run() -> None:
    """The `mm1` command: `main`, then exit with its status; after Ctrl-C at once (os._exit), not
    after what the interrupted command left running has ended (a Dask client still connecting, a
    loader's workers: interpreter exit waits for such threads, a minute for a silent scheduler).
    A second Ctrl-C exits at once wherever the first left the process (`_on_sigint`). Nothing is
    lost: a curation run commits its work atomically, a training run its checkpoints."""
    signal.signal(signal.SIGINT, _on_sigint)
    code = main()
    if code == EXIT_INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
