"""What `mm1` exits with, and the checks that choose an exit status other than 0 or 1.

The exit statuses (one table for every command: `EXIT_CODES`, shown by `mm1 --help` and the README):
0 success; 1 a bug (an uncaught exception, with its traceback); 2 a recipe, input or environment
problem (one short message); 3 training diverged; 4 `mm1 verify` found damage; 5 a curation run
that kept nothing of a kind it had inputs for, or where one stage dropped every row of the at
least 20 that reached it; 130 interrupted (Ctrl-C).

`missing_extra(exc)` turns a ModuleNotFoundError for a module of an optional extra into the line
saying what to install. `kept_nothing(out, recipe)` reads a finished output's ledger and manifest
and says, per kind that had inputs and kept none, which stage dropped them, and per stage that
dropped all of its at least 20 rows, with the top reason and an example;
`retry_kept_nothing(entry)` judges a retry round by its own counts.

Standard library only at import: `mm1 --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: pyarrow is not imported at CLI start-up
    import pyarrow as pa

EXIT_OK = 0
EXIT_BUG = 1
EXIT_INPUT = 2
EXIT_DIVERGED = 3  # train.trainer.EXIT_DIVERGED (not imported: it loads torch)
EXIT_DAMAGED = 4
EXIT_EMPTY = 5
JUDGED_ROWS = 20  # a stage that dropped every row reaching it is an exit 5 from this many rows on
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

EXIT_CODES = f"""exit status (every command):
  {EXIT_OK}    success
  {EXIT_BUG}    a bug: an uncaught exception (its traceback is printed; please report it)
  {EXIT_INPUT}    a recipe, input or environment problem: one message saying what, where and what to do
       (-v adds the traceback)
  {EXIT_DIVERGED}    mm1 train: training diverged (max_bad_steps non-finite steps in a row)
  {EXIT_DAMAGED}    mm1 verify: the output is damaged (each problem is printed as FAIL ...)
  {EXIT_EMPTY}    mm1 curate: the run finished but kept nothing of a kind it had inputs for, or one
       stage dropped every row of the at least {JUDGED_ROWS} that reached it; the stage, its top reason
       and an example are printed (--allow-empty: a warning)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); run the same command again to resume"""

# top-level module -> the optional dependency group of pyproject.toml that installs it
OPTIONAL_EXTRAS: dict[str, str] = {
    "torch": "clip",
    "torchvision": "clip",
    "open_clip": "clip",
    "timm": "clip",
    "safetensors": "train",
    "transformers": "vecap",
    "spacy": "text",
    "cv2": "safety",
    "phonenumbers": "safety",
    "s3fs": "s3",
    "gcsfs": "gcs",
    "tensorboard": "tensorboard",
    "skimage": "demo",
    "sklearn": "demo",
    "img2dataset": "bench",
    "trafilatura": "bench",
    "resiliparse": "bench",
}
# commands whose missing torch, torchvision or open_clip is the train extra's (it holds clip's)
TRAINER_COMMANDS = ("train", "export")


def missing_extra(exc: ModuleNotFoundError, command: str | None = None) -> str | None:
    """The message for a missing module of an optional extra (for `command`: the trainer's
    commands name the train extra); None for any other module."""
    top = (exc.name or "").split(".")[0]
    extra = OPTIONAL_EXTRAS.get(top)
    if extra is None:
        return None
    if extra == "clip" and command in TRAINER_COMMANDS:
        extra = "train"
    return f"needs the optional dependency {top}: pip install 'mm1-pipeline[{extra}]'"


def kept_nothing(out: str | Path, recipe: Mapping[str, Any]) -> list[str]:
    """What makes a finished run exit 5, one line each, from the output at `out`:
    - per record kind that had inputs and kept none: the last stage (in `recipe`'s order, the
      source first) that dropped any of them, which dropped every row of the kind that reached it;
    - per stage that dropped every row of the at least `JUDGED_ROWS` that reached it (the
      manifest's `stages` rows_in and rows_out, where it records them), though its kinds kept
      rows another way; a stage the first rule named already is not named again.
    Each with the stage's top reason and one example from the ledger: its id, url and drop detail."""
    # pyarrow and curate only when a run has finished (CLI start-up)
    import pyarrow.compute as pc

    from curate.contract import Manifest, read_ledger  # (as above)

    order = ["source", *(s.get("name") or s["kind"] for s in recipe.get("stages", []))]
    ledger = read_ledger(out, columns=["id", "kind", "url", "outcome", "stage", "drop_reason", "drop_detail"])
    problems, named = [], set()
    for kind in sorted(set(ledger.column("kind").to_pylist())):
        rows = ledger.filter(pc.equal(ledger.column("kind"), kind))
        if pc.any(pc.equal(rows.column("outcome"), "kept")).as_py():
            continue
        stage = max(set(rows.column("stage").to_pylist()), key=lambda s: (order.index(s) if s in order else -1, str(s)))
        named.add(stage)
        dropped, why = _top_reason(rows, stage)
        problems.append(f"kept no {kind} of {rows.num_rows} inputs: stage {stage!r} dropped all {dropped} "
                        f"that reached it, {why}")
    times = Manifest.read(out).stages or {}
    for stage, t in sorted(times.items(), key=lambda item: item[1].get("order", 0)):
        if stage in named or t.get("rows_in", 0) < JUDGED_ROWS or t.get("rows_out", 0) != 0:
            continue
        _, why = _top_reason(ledger, stage)
        problems.append(f"stage {stage!r} dropped all {t['rows_in']} rows that reached it, {why}")
    return problems


def _top_reason(rows: pa.Table, stage: str) -> tuple[int, str]:
    """(rows of the ledger table `rows` that `stage` dropped, "most for REASON (N), e.g. ID (URL):
    DETAIL"); the second part says so where the ledger holds none of its drops."""
    import pyarrow.compute as pc  # only once a run has finished (CLI start-up)

    at_stage = rows.filter(pc.and_(pc.equal(rows.column("stage"), stage),
                                   pc.equal(rows.column("outcome"), "dropped")))
    if not at_stage.num_rows:
        return 0, "and the ledger records none of its drops"
    counts = at_stage.group_by(["drop_reason"]).aggregate([("id", "count")]).to_pylist()
    top = max(counts, key=lambda c: (c["id_count"], str(c["drop_reason"])))
    example = at_stage.filter(pc.equal(at_stage.column("drop_reason"), top["drop_reason"])).slice(0, 1)
    ex = {name: example.column(name)[0].as_py() for name in ("id", "url", "drop_detail")}
    detail = ex["drop_detail"] or ""
    return at_stage.num_rows, (
        f"most for {top['drop_reason']!r} ({top['id_count']}), e.g. {ex['id']}"
        + (f" ({ex['url']})" if ex["url"] else "")
        + (f": {detail[:200]}{'...' if len(detail) > 200 else ''}" if detail else ""))


def retry_kept_nothing(entry: Mapping[str, Any]) -> list[str]:
    """A retry round (its `retries` entry) that retried rows and recovered none."""
    if entry.get("retried", 0) and not entry.get("recovered", 0):
        return [f"retry round {entry.get('round')} recovered none of the {entry['retried']} rows it retried: "
                f"{entry.get('failed_again', 0)} failed again (transient), {entry.get('dropped', 0)} dropped "
                f"for other reasons"]
    return []
