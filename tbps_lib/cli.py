"""The ``tbps`` command.

``tbps data inspect`` summarises a dataset per split; ``tbps data synth`` writes the synthetic benchmark.
``tbps train`` trains (or resumes, or just loads) the run of a method/dataset/preset plus ``--set`` changes;
``tbps eval RUN_DIR`` evaluates a run's selected checkpoint on a split, optionally re-ranked;
``tbps runs list`` tables the run registry; ``tbps pretrain`` trains the pretrained smoke backbones;
``tbps search RUN "caption" [--gallery DIR]`` ranks a run's test gallery, or a folder of images, for a caption
(``tbps_lib.search``; RUN is a run folder or a file written by ``tbps export``);
``tbps export RUN_DIR --out model.tbps`` writes a trained run as one portable file (``tbps_lib.export``);
``tbps reproduce`` trains every run the notebooks need, several processes at a time (``make reproduce``).
Each sub-command is a small function over the library; errors in the input are printed as one clear line
(exit status 2), never as a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from tbps_lib.data.catalog import load_dataset
from tbps_lib.engine.evaluate import RERANKERS, RESCORE
from tbps_lib.engine.metrics import METRIC_NAMES
from tbps_lib.data.formats import READERS, DatasetError, split_counts


#: Skipped files of a folder gallery listed by ``tbps search`` (the rest are counted).
SKIPPED_SHOWN = 20


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HEIGHTxWIDTH (e.g. 128x64), got {text!r}")
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Print per-split images, identities, captions and caption-length statistics."""
    ds = load_dataset(args.dataset, root=args.root, strict=not args.lenient)
    if args.json:
        print(json.dumps(split_counts(ds), indent=2))
        return 0
    print(f"{ds.name} at {ds.root}")
    header = f"{'split':<6} {'images':>8} {'ids':>7} {'captions':>9}  words/caption mean±std [min, median, max]"
    print(header)
    for s, st in ds.stats().items():
        print(f"{s:<6} {st['images']:>8} {st['ids']:>7} {st['captions']:>9}  "
              f"{st['words_mean']:.1f}±{st['words_std']:.1f} [{st['words_min']}, "
              f"{st['words_median']:g}, {st['words_max']}]")
    if ds.report.n_skipped or ds.report.notes:
        print(ds.report.summary())
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    """Write the synthetic benchmark in the CUHK-PEDES layout."""
    from tbps_lib.data import synthetic

    out = synthetic.generate(args.preset, Path(args.out), seed=args.seed, ids=args.ids, size=args.size,
                             difficulty=args.difficulty, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _changes(pairs: Sequence[str]) -> dict[str, str]:
    """``--set key=value`` arguments as a dict (values stay strings: ``config.override`` converts them)."""
    changes: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value (e.g. optim.lr=1e-4), got {pair!r}")
        changes[key.strip()] = value.strip()
    return changes


def _metric_line(metrics: dict) -> str:
    return "  ".join(f"{k} {metrics[k]:.2f}" for k in METRIC_NAMES if k in metrics)


def cmd_train(args: argparse.Namespace) -> int:
    """Train the run of a config (resuming an interrupted one; loading a finished one) and print its metrics."""
    from tbps_lib.config import make_config
    from tbps_lib.engine.runs import train_or_load
    from tbps_lib.engine.trainer import init_distributed

    cfg = make_config(args.method, preset=args.preset, dataset=args.dataset, changes=_changes(args.set))
    world, rank = init_distributed()
    run = train_or_load(cfg, runs_dir=args.runs, progress=not args.quiet, device=args.device)
    if rank == 0:
        m = run.metrics
        print(f"run {run.dir} ({'trained' if run.trained_now else 'already trained'})")
        for note in m.get("dataset_notes", []):
            print(f"note: {note}")
        print(f"val  (epoch {m['selected']['epoch']}): {_metric_line(m['val'])}")
        print(f"test: {_metric_line(m['test'])}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Train (or find in the cache) the workbook's pretrained smoke backbones (``tbps_lib.pretrain``)."""
    from tbps_lib import pretrain

    for arch in args.arch or sorted(pretrain.WORKBOOK_WEIGHTS):
        folder = pretrain.ensure_pretrained(pretrain.workbook_config(arch, "--arch"), progress=not args.quiet)
        info = pretrain.pretraining_info(arch)
        last = pretrain.pretraining_history(arch)[-1]
        print(f"{pretrain.WORKBOOK_PREFIX}{arch}: {folder} (trained in {info['train_time_s']} s on "
              f"{info['threads']} threads; final val accuracy {last['val_accuracy']:.3f})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a run's selected checkpoint on a split (cached embeddings), optionally re-ranked."""
    from tbps_lib.engine.runs import load_run

    run = load_run(args.run_dir, device=args.device)
    metrics = run.evaluate(args.split, rerank=args.rerank)
    if args.json:
        print(json.dumps({"metrics": metrics, "rerank": args.rerank, "provenance": run.provenance(args.split)},
                         indent=2))
    else:
        print(f"{run.name} {args.split}{' + ' + args.rerank if args.rerank else ''}: {_metric_line(metrics)}")
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    """Print the runs under the registry root as a table (or JSON records); ``--stale``: only the runs made
    by other code than the current library."""
    from tbps_lib.engine.runs import list_runs, runs_root

    table = list_runs(args.runs, only_stale=args.stale)
    if args.json:
        print(table.to_json(orient="records", indent=2))
    elif table.empty:
        print(f"no {'stale ' if args.stale else ''}runs under {runs_root(args.runs)}")
    else:
        print(table.drop(columns=["dir"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Print the top-k images of a run's split, or of a folder (``--gallery``), for a caption (or as JSON).
    With a folder, a summary of the skipped files goes to stderr (all of them in the JSON)."""
    from tbps_lib.engine.runs import load_run
    from tbps_lib.export import is_exported_file
    from tbps_lib.search import CaptionSearch, summary_line

    progress = not args.json and sys.stderr.isatty()
    if is_exported_file(args.run):
        if args.gallery is None:
            raise ValueError(f"{args.run} is an exported model: give the folder to search with --gallery DIR")
        searcher = CaptionSearch.from_file(args.run, args.gallery, device=args.device, fit=args.fit,
                                           progress=progress)
    else:
        searcher = CaptionSearch.from_run(load_run(args.run, device=args.device), args.split, gallery=args.gallery,
                                          fit=args.fit, progress=progress)
    table = searcher.search(args.caption, k=args.k, rerank=args.rerank)
    folder = searcher.folder_gallery
    if args.json:
        attrs = {k: table.attrs[k] for k in ("caption", "k", "rerank", "scoring", "true_pid", "unknown_words",
                                             "latency_ms", "gallery")}
        if folder is not None:
            attrs["skipped"] = folder.skip_report().to_dict(orient="records")
        print(json.dumps({**attrs, "results": table.to_dict(orient="records")}, indent=2))
    else:
        if folder is not None:
            print(folder.summary(), file=sys.stderr)
            for item in folder.skipped[:SKIPPED_SHOWN]:
                print(f"  skipped {item.path}: {item.reason}", file=sys.stderr)
            if len(folder.skipped) > SKIPPED_SHOWN:
                print(f"  ... and {len(folder.skipped) - SKIPPED_SHOWN} more (all of them with --json)",
                      file=sys.stderr)
        print(f"{searcher.name}: {summary_line(table)}")
        hidden = ["gallery_index"] + (["pid", "match"] if folder is not None else [])  # unknown in a folder
        print(table.drop(columns=hidden).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a finished run as one portable file (weights, config, tokenizer, method, metrics)."""
    from tbps_lib.engine.runs import load_run
    from tbps_lib.export import export_run

    run = load_run(args.run_dir, device="cpu")
    path = export_run(run, args.out)
    print(f"{run.name} -> {path} ({path.stat().st_size / 2**20:.1f} MiB); search a folder with: "
          f"tbps search {path} \"caption\" --gallery DIR")
    return 0


def _roots(pairs: Sequence[str]) -> dict[str, str]:
    """``--root NAME=FOLDER`` arguments (paper dataset names, e.g. CUHK-PEDES=/data/CUHK-PEDES) as a dict."""
    roots: dict[str, str] = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ValueError(f"--root expects NAME=FOLDER (e.g. CUHK-PEDES=/data/CUHK-PEDES), got {pair!r}")
        roots[name.strip()] = folder.strip()
    return roots


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Train every run the notebooks need, ``--jobs`` processes at a time: each method's default run and the
    rows of the tables its notebook trains in the budget (``analysis.tables.reproduce_plan``), with the
    pretrained smoke backbones they load as the first jobs of the same pool (``engine.runs.train_many``).
    ``make reproduce`` runs this before executing the notebooks, which then only load runs."""
    import time

    from tbps_lib import pretrain
    from tbps_lib.analysis.tables import reproduce_plan
    from tbps_lib.config import BUDGETS, NotebookParams
    from tbps_lib.engine.runs import find_run, train_many, workbook_weights
    from tbps_lib.models.registry import list_methods

    methods = args.methods or list_methods()
    unknown = sorted(set(methods) - set(list_methods()))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {list_methods()}")
    budget = BUDGETS[args.budget]
    params = NotebookParams.of(budget.name, args.mode, args.data, args.runs or "")
    plan = reproduce_plan(methods, params)
    distinct = plan.drop_duplicates("hash")
    runs_dir = args.runs or None
    found = [find_run(cfg, runs_dir) for cfg in distinct["config"]]
    status = distinct.assign(done=[run is not None for run in found],
                             stale=[run is not None and bool(run.stale) for run in found])
    counts = status.groupby("method", sort=False)[["done", "stale"]].agg(["size", "sum"])
    print(f"budget {budget.name}, mode {args.mode}, seeds 0..{params.seeds - 1}, {args.jobs} job(s) x "
          f"{args.threads} thread(s):")
    for method, row in counts.iterrows():
        stale = int(row[("stale", "sum")])
        print(f"  {method}: {int(row[('done', 'size')])} distinct runs, {int(row[('done', 'sum')])} already finished"
              + (f" ({stale} made by other code: loaded as they are unless TBPS_STALE=retrain)" if stale else ""))
    if args.dry_run:
        return 0
    start = time.perf_counter()
    weights = pretrain.training_order(set().union(*(workbook_weights(c) for c in distinct["config"])))
    fresh = [w for w in weights if not pretrain.is_complete(pretrain.weights_dir(pretrain.workbook_config(w)))]
    result = train_many(list(distinct["config"]), runs_dir, args.jobs, args.threads, progress=not args.quiet)
    total = time.perf_counter() - start
    trained = result[result["trained_now"]]
    made = ", ".join(f"{w} {pretrain.pretraining_info(w)['train_time_s']:.0f} s" for w in fresh) or "none"
    print(f"pretrained weights trained ({made}) beside {len(trained)} runs "
          f"({trained['wall_time_s'].sum():.0f} s of run time), {len(result) - len(trained)} loaded; "
          f"wall time {total:.0f} s")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    """Write the papers' tables (reported + reproduced from the run registry) and the leaderboard as Markdown
    and CSV; optionally rewrite the README's generated section. Never trains."""
    import shlex

    from tbps_lib.analysis.results import check_readme, readme_section, update_readme, write_results
    from tbps_lib.analysis.tables import DEFAULT_SEEDS, compact

    seeds = args.seeds or DEFAULT_SEEDS
    if args.readme:
        check_readme(args.readme)  # before the work, so a README without markers fails fast
    command = ["tbps", "tables", "--out", args.out, "--preset", args.preset, "--seeds", str(seeds)]
    command += ["--papers", *args.papers] if args.papers else []
    command += [x for pair in args.root for x in ("--root", pair)]
    command += ["--readme", args.readme] if args.readme else []
    res = write_results(args.out, preset=args.preset, papers=args.papers, runs_dir=args.runs,
                        roots=_roots(args.root), board_data=args.leaderboard_data, command=shlex.join(command),
                        n_queries=args.queries, device=args.device, seeds=seeds)
    if args.readme:
        update_readme(args.readme, readme_section(res, args.out, args.leaderboard_data))
    fmt = lambda v: f"{v:.2f}"  # noqa: E731
    print(res.header)
    print("\nrows per status:\n" + res.counts.to_string())
    print("\nsign agreement (R1; agree / disagree only beyond 2 standard errors of the paired difference):\n"
          + res.signs.to_string(float_format=lambda v: f"{v:.1f}"))
    measured = [f for frames in res.tables.values() for f in frames.values()
                if f is not None and (f["status"] == "measured").any()]
    for frame in measured:
        print(f"\n{frame.attrs['paper']} Table {frame.attrs['table']} (measured rows):")
        rows = compact(frame)[frame["status"] == "measured"].drop(columns=["status", "reason"])
        print(rows.to_string(index=False, float_format=fmt, na_rep="-"))
    print(f"\nleaderboard ({args.leaderboard_data}):")
    print(res.board.drop(columns=["preset", "reason", "train_device"]).to_string(index=False, float_format=fmt,
                                                                                 na_rep="-"))
    print(f"\nwrote {len(res.files)} files under {args.out}" + (f"; updated {args.readme}" if args.readme else ""))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    """Regenerate the figures every registered method declares (training missing runs) and print their
    numbers."""
    from tbps_lib.analysis.figures import regenerate

    out = regenerate(methods=args.methods, mode=args.mode, data=args.data, runs_dir=args.runs, split=args.split,
                     n_captions=args.captions, progress=not args.quiet, figures=args.figures)
    for name, table in out.tables.items():
        print(f"== {name}")
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    for name, paths in out.paths.items():
        print(f"wrote {name}: {', '.join(str(p) for p in paths)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tbps_lib.config import BUDGETS

    parser = argparse.ArgumentParser(prog="tbps", description="Text-based person search workbook.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect or generate datasets").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("inspect", help="per-split statistics of a dataset")
    p.add_argument("--dataset", required=True,
                   help=f"one of {sorted(READERS)}, synthetic:<preset>, or a dataset folder")
    p.add_argument("--root", help="the dataset folder (for a named dataset)")
    p.add_argument("--json", action="store_true", help="print {split: {images, ids, captions}} as JSON")
    p.add_argument("--lenient", action="store_true", help="skip bad records and report them instead of failing")
    p.set_defaults(func=cmd_data_inspect)

    p = data.add_parser("synth", help="generate the synthetic benchmark")
    p.add_argument("--preset", default="cuhk-like", help="cuhk-like, icfg-like or rstp-like")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ids", type=int, default=None, help="number of identities (default: the preset's)")
    p.add_argument("--size", type=_size, default=(128, 64), help="image HEIGHTxWIDTH (default 128x64)")
    p.add_argument("--difficulty", type=float, default=None, help="how alike identities are (preset default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("train", help="train (or resume, or load) the run of a method and config")
    p.add_argument("--method", required=True, help="a registered method, e.g. baseline")
    p.add_argument("--dataset", default=None,
                   help="synthetic:<preset> (default synthetic:cuhk-like), a dataset name, or a folder")
    p.add_argument("--preset", default="smoke", help="smoke (CPU minutes) or paper (the paper's settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted name, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--runs", default=None, help="run registry folder (default $TBPS_RUNS or ./runs)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default $TBPS_DEVICE or auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="train the workbook's pretrained smoke backbones (cached)")
    p.add_argument("--arch", action="append", default=[], metavar="ARCH",
                   help="resnet_smoke, vit_smoke, swin_smoke, bert_smoke, bigru_smoke or bilstm_smoke "
                        "(repeatable; default all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate a trained run on a split")
    p.add_argument("run_dir", help="the run folder (as printed by tbps train)")
    p.add_argument("--split", default="test", help="val or test (default test)")
    p.add_argument("--rerank", default=None, choices=[*RERANKERS, RESCORE],
                   help="re-rank the text-to-image scores (k_reciprocal: the released code's form; "
                        "k_reciprocal_paper: the paper text's; rescore: the method's second stage on the top-k)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default $TBPS_DEVICE or auto)")
    p.add_argument("--json", action="store_true", help="print metrics and provenance as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("search", help="rank a trained run's gallery, or a folder of images, for a caption")
    p.add_argument("run", help="the run folder (as printed by tbps train) or a file written by tbps export")
    p.add_argument("caption", help="the description of a person, in quotes")
    p.add_argument("--gallery", default=None, metavar="DIR",
                   help="search the images under this folder (recursively; .jpg .jpeg .png .webp .bmp) instead of "
                        "the run's split; embeddings are cached, bad files skipped and listed")
    p.add_argument("--fit", default="stretch", choices=["stretch", "pad"],
                   help="folder images: stretch to the input size as in training (default) or pad to its aspect "
                        "ratio first")
    p.add_argument("--k", type=int, default=10, help="how many images to list (default 10)")
    p.add_argument("--rerank", default=None, choices=[*RERANKERS, RESCORE],
                   help="re-rank the scores (visual neighbourhoods, k-reciprocal, or the method's second stage)")
    p.add_argument("--split", default="test", help="the gallery: every image of this split (default test)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default $TBPS_DEVICE or auto)")
    p.add_argument("--json", action="store_true", help="print the query details and results as JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write a trained run as one portable file (safetensors + JSON header)")
    p.add_argument("run_dir", help="the run folder (as printed by tbps train)")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.tbps")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("figures", help="regenerate every registered method's figures from the run registry")
    p.add_argument("--methods", nargs="+", default=None,
                   help="registered methods to compare (default: all); missing runs are trained")
    p.add_argument("--mode", default=os.environ.get("TBPS_MODE", "smoke"),
                   help="preset: smoke or paper (default $TBPS_MODE or smoke)")
    p.add_argument("--data", default=os.environ.get("TBPS_DATA") or None,
                   help="synthetic:<preset>, a dataset name or a folder (default $TBPS_DATA or synthetic:cuhk-like)")
    p.add_argument("--runs", default=None, help="run registry folder (default $TBPS_RUNS or ./runs)")
    p.add_argument("--split", default="test", help="the split the figures show (default test)")
    p.add_argument("--captions", type=int, default=120, help="captions per method in the pointing game")
    p.add_argument("--figures", nargs="+", default=None, metavar="NAME",
                   help="only these figures (default: every figure the registered methods declare)")
    p.add_argument("--quiet", action="store_true", help="no progress bar while training")
    p.set_defaults(func=cmd_figures)

    runs = sub.add_parser("runs", help="the run registry").add_subparsers(dest="runs_cmd", required=True)
    p = runs.add_parser("list", help="one line per run: method, hash, status, stale, test metrics")
    p.add_argument("--runs", default=None, help="run registry folder (default $TBPS_RUNS or ./runs)")
    p.add_argument("--stale", action="store_true",
                   help="only runs made by other code than the current library (retrain them with "
                        "TBPS_STALE=retrain or train_or_load(..., stale='retrain'))")
    p.add_argument("--json", action="store_true", help="print the table as JSON records")
    p.set_defaults(func=cmd_runs_list)

    p = sub.add_parser("reproduce", help="train every run the notebooks need, several at a time (make reproduce)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="registered methods (default all)")
    p.add_argument("--budget", default=os.environ.get("TBPS_BUDGET", "full"), choices=sorted(BUDGETS),
                   help="notebook budget: ci (make test), full (make reproduce), all (every table row) or "
                        "check (make test-paper); "
                        "default $TBPS_BUDGET or full")
    p.add_argument("--mode", default=os.environ.get("TBPS_MODE", "smoke"), choices=["smoke", "paper"])
    p.add_argument("--data", default=os.environ.get("TBPS_DATA") or "synthetic:cuhk-like",
                   help="dataset of the methods' default runs (default $TBPS_DATA or synthetic:cuhk-like)")
    p.add_argument("--runs", default=None, help="run registry folder (default $TBPS_RUNS or ./runs)")
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="runs trained at once, one process each (default: 2, or 1 on a one-core machine)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("tables", help="write the papers' tables (reported + reproduced) and the leaderboard")
    p.add_argument("--out", default="results", help="output folder (default results)")
    p.add_argument("--preset", default="smoke", choices=["smoke", "paper"],
                   help="smoke: synthetic stand-ins for the papers' datasets; paper: the real datasets")
    p.add_argument("--papers", nargs="+", default=None, metavar="PAPER",
                   help="paper ids (sew_mcm part_level acsa laip dssl; default all)")
    p.add_argument("--runs", default=None, help="run registry folder (default $TBPS_RUNS or ./runs)")
    p.add_argument("--root", action="append", default=[], metavar="NAME=FOLDER",
                   help="folder of a real dataset for the paper preset, e.g. CUHK-PEDES=/data/CUHK-PEDES "
                        "(default $TBPS_CUHK_PEDES_ROOT, $TBPS_ICFG_PEDES_ROOT, $TBPS_RSTPREID_ROOT)")
    p.add_argument("--leaderboard-data", default="CUHK-PEDES",
                   help="dataset of the leaderboard: a paper dataset name or a dataset spec (default CUHK-PEDES)")
    p.add_argument("--queries", type=int, default=50, help="caption queries timed per method (default 50)")
    p.add_argument("--seeds", type=int, default=None,
                   help="each table row is read for seeds 0..N-1 (default tables.DEFAULT_SEEDS, 3)")
    p.add_argument("--readme", default=None, help="rewrite this README's generated section (between its markers)")
    p.add_argument("--device", default=None, help="cpu, cuda ... for evaluations (default $TBPS_DEVICE or auto)")
    p.set_defaults(func=cmd_tables)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors printed as one line: bad input, missing files, and a stopped training (whose module is only
    imported, with torch, by the commands that train)."""
    errors: list[type[BaseException]] = [DatasetError, FileNotFoundError, ValueError]
    trainer = sys.modules.get("tbps_lib.engine.trainer")
    if trainer is not None:
        errors.append(trainer.TrainingError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tbps`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as e:
        print(f"tbps: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
