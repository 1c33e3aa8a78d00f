"""``python main.py <command>``: serve (default), pipeline, export, evaluate, params, docs, sample-data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semisam_o1.config import OPTIONS, AppConfig, is_dicomweb
from semisam_o1.parsers import ConfError
from semisam_o1.sample_data import SAMPLE_DATASTORE, SampleDataError, load_manifest, populate, verify


def _conf_pairs(pairs: list[list[str]] | None, ray_address: str | None = None, settings: list[str] | None = None,
                params: Path | None = None) -> dict[str, str]:
    """The app's conf from ``--conf KEY VALUE`` pairs, ``--ray-address``, ``--set SECTION.FIELD=VALUE`` (conf key
    ``SECTION.FIELD``) and ``--params FILE`` (conf key ``params``).

    Raises:
        ConfError: a ``--set`` that is not ``SECTION.FIELD=VALUE``.
    """
    conf = {k: v for k, v in (pairs or [])}
    for entry in settings or []:
        key, sep, value = entry.partition("=")
        if not sep or "." not in key:
            raise ConfError(f"--set {entry}: not SECTION.FIELD=VALUE (python main.py params lists them)")
        conf[key.strip()] = value.strip()
    if params is not None:
        conf["params"] = str(params)
    return conf if ray_address is None else {**conf, "ray_address": ray_address}


def sample_conf(studies: Path) -> dict[str, str]:
    """``--conf labels`` of a datastore that carries a manifest (the sample datastore), else nothing."""
    manifest = studies / "manifest.json"
    if not manifest.exists():
        return {}
    labels = load_manifest(manifest).get("labels", {})
    return {"labels": ",".join(f"{name}={value}" for name, value in labels.items())} if labels else {}


def cmd_serve(args) -> int:
    studies = args.studies
    try:
        conf = _conf_pairs(args.conf, args.ray_address, args.set, args.params)
    except ConfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_dicomweb(studies):
        studies = Path(studies)
        if studies.resolve() == SAMPLE_DATASTORE.resolve() and verify(studies):
            print("sample datastore incomplete; filling it first (python main.py sample-data)")
            try:
                populate(studies)
            except SampleDataError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        if not studies.is_dir():
            print(f"error: studies folder {studies} does not exist", file=sys.stderr)
            return 2
        conf = {**sample_conf(studies), **conf}
    from semisam_o1.distributed import ClusterError, check_reachable

    try:
        check_reachable(AppConfig.from_conf(conf).ray_address)
    except (ConfError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from semisam_o1.server.launch import ServeRefused, serve

    try:
        serve(studies, conf, host=args.host, port=args.port, log_level=args.log_level, insecure=args.insecure)
    except ServeRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_sample_data(args) -> int:
    try:
        result = populate(args.studies)
    except SampleDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    problems = verify(args.studies)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(json.dumps(result))
    return 1 if problems else 0


def cmd_pipeline(args) -> int:
    from semisam_o1.distributed import ClusterError
    from semisam_o1.pipeline import first_label_advice, run_stage_one, run_stage_two
    from semisam_o1.volumes import InputError

    studies = Path(args.studies)
    if not studies.is_dir():
        print(f"error: studies folder {studies} does not exist", file=sys.stderr)
        return 2
    truth = args.truth or (studies / "truth" if (studies / "truth").is_dir() else None)
    try:
        conf = {**sample_conf(studies), **_conf_pairs(args.conf, args.ray_address, args.set, args.params)}
        if args.rounds is not None:
            conf["rounds"] = str(args.rounds)
        config = AppConfig.from_conf(conf)
        advice = first_label_advice(studies, config)
        if advice:
            print(f"error: no image of {studies} has a 'final' label yet; {advice}", file=sys.stderr)
            return 2
        report = run_stage_one(studies, config)
        print(f"stage 1: {report['images']} pseudo-labels (tag 'pseudo') in {report['seconds']} s")
        for image_id, reason in report["errors"].items():
            print(f"stage 1: skipped {image_id}: {reason}")
        if args.stage != 1:
            report = run_stage_two(studies, config, truth=truth, report_dir=args.report)
            print(f"stage 2: {len(report['rounds'])} rounds; " + (f"pool Dice per round {[round(d, 3) for d in report['pool_dice_per_round']]}; " if "pool_dice_per_round" in report else "") + f"report in {args.report or studies / '.semisam' / 'report'}")
    except (ConfError, InputError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    from semisam_o1.pipeline import export_bundle
    from semisam_o1.stage_two.export import NothingPublished

    studies = Path(args.studies)
    if not studies.is_dir():
        print(f"error: studies folder {studies} does not exist", file=sys.stderr)
        return 2
    try:
        config = AppConfig.from_conf({**sample_conf(studies), **_conf_pairs(args.conf, None, args.set, args.params)})
        out = export_bundle(studies, config, args.out)
    except ConfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NothingPublished as e:
        print(f"error: {studies}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write the bundle to {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote the MONAI Bundle {out}; run it with: python -m monai.bundle run --config_file {out}/configs/inference.json "
          f"--bundle_root {out} --dataset_dir IMAGES --output_dir LABELS")
    return 0


def cmd_evaluate(args) -> int:
    from semisam_o1.config import parse_label_map
    from semisam_o1.evaluation import evaluate_folders
    from semisam_o1.volumes import InputError

    try:
        result = evaluate_folders(args.pred, args.truth, parse_label_map(args.labels))
    except (ConfError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(evaluation_table(result))
    print(f"mean Dice {result['mean_dice']:.3f} over {len(result['cases'])} cases" + (f"; no prediction for {len(result['missing'])}" if result["missing"] else ""))
    return 0


def evaluation_table(result: dict) -> str:
    """``evaluate``'s table: one row per case and the mean, a Dice and an HD95 column per class, every column as
    wide as its header or values (and at least two spaces apart), so long class names never run together."""
    header = ["case"] + [f"{n} {m}" for n in result["mean"] for m in ("Dice", "HD95")]
    rows = [[case] + [f"{v[m]:.{d}f}" for v in s.values() for m, d in (("dice", 3), ("hd95", 2))]
            for case, s in [*result["cases"].items(), ("mean", result["mean"])]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: r[0].ljust(widths[0]) + "".join("  " + c.rjust(w) for c, w in zip(r[1:], widths[1:]))  # noqa: E731
    return "\n".join(line(r) for r in [header, *rows])


def cmd_params(args) -> int:
    from semisam_o1.research import research_settings

    rows = research_settings()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        print(f"{r['key']:<{width}}  {r['default']:<16} {r['help']}")
    print("\nset one with --set SECTION.FIELD=VALUE (serve, pipeline) or a --params FILE (JSON/YAML: {section: {field: value}})")
    return 0


def cmd_docs(args) -> int:
    from semisam_o1.docs import render_readme

    readme = Path(args.readme)
    text = render_readme(readme.read_text())
    if args.check:
        if text != readme.read_text():
            print(f"{readme} differs from what python main.py docs writes: run it and commit", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    print(f"wrote {readme}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="SemiSAM-O1 Label: one template -> a labelled study pool.")
    sub = parser.add_subparsers(dest="command")

    conf_help = ("operator option (repeatable): " + "; ".join(f"{k}: {h}" for k, h in OPTIONS)).replace("%", "%%")  # argparse %-formats help
    set_help = "research setting (repeatable), e.g. --set stage_two.warm_lr=2; python main.py params lists them"
    params_help = "JSON or YAML file of research settings, {section: {field: value}}"
    serve = sub.add_parser("serve", help="start the MONAI Label server (default command)")
    serve.add_argument("--studies", default=str(SAMPLE_DATASTORE), help="datastore folder or DICOMweb URL")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only; any other address needs MONAI_LABEL_AUTH_ENABLE or --insecure)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without authentication (trusted networks only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help=conf_help)
    serve.add_argument("--ray-address", default=None, help="pool-wide jobs on Ray: local, auto, host:port or ray://host:port (= --conf ray_address)")
    serve.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help=set_help)
    serve.add_argument("--params", type=Path, default=None, metavar="FILE", help=params_help)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    pipeline = sub.add_parser("pipeline", help="run SemiSAM-O1 over a datastore from the command line")
    pipeline.add_argument("--studies", default=str(SAMPLE_DATASTORE), help="local datastore folder")
    pipeline.add_argument("--stage", type=int, choices=[1, 2], default=2, help="1: template propagation only; 2: then self-training rounds (default)")
    pipeline.add_argument("--rounds", type=int, default=None, help="stage-two rounds (default: --conf rounds, 3)")
    pipeline.add_argument("--truth", type=Path, default=None, help="ground-truth folder for Dice per round (default: <studies>/truth if present)")
    pipeline.add_argument("--report", type=Path, default=None, help="report folder (default: <studies>/.semisam/report)")
    pipeline.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help=conf_help)
    pipeline.add_argument("--ray-address", default=None, help="run stage one's per-image work on Ray: local, auto, host:port or ray://host:port (= --conf ray_address)")
    pipeline.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help=set_help)
    pipeline.add_argument("--params", type=Path, default=None, metavar="FILE", help=params_help)
    pipeline.set_defaults(func=cmd_pipeline)

    export = sub.add_parser("export", help="write the published stage-two network as a MONAI Bundle (python -m monai.bundle run)")
    export.add_argument("--studies", default=str(SAMPLE_DATASTORE), help="local datastore folder whose published network to export")
    export.add_argument("--out", type=Path, required=True, help="bundle folder to write (configs/, models/, docs/; created)")
    export.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help=conf_help + " (the ones the server runs with)")
    export.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help=set_help)
    export.add_argument("--params", type=Path, default=None, metavar="FILE", help=params_help)
    export.set_defaults(func=cmd_export)

    evaluate = sub.add_parser("evaluate", help="Dice and HD95 per class of predictions vs ground truth")
    evaluate.add_argument("--pred", type=Path, required=True, help="folder of predicted label files")
    evaluate.add_argument("--truth", type=Path, required=True, help="folder of ground-truth label files (same names)")
    evaluate.add_argument("--labels", default="anterior=1,posterior=2", help="classes to score, name=value,...")
    evaluate.set_defaults(func=cmd_evaluate)

    params = sub.add_parser("params", help="list the research settings (--set SECTION.FIELD=VALUE) with their defaults")
    params.add_argument("--json", action="store_true", help="as JSON")
    params.set_defaults(func=cmd_params)

    docs = sub.add_parser("docs", help="regenerate README.md's tables (results from benchmarks/results, options from the code)")
    docs.add_argument("--readme", default=str(Path(__file__).resolve().parents[2] / "README.md"))
    docs.add_argument("--check", action="store_true", help="only check that README.md is up to date (exit 1 if not)")
    docs.set_defaults(func=cmd_docs)

    sample = sub.add_parser("sample-data", help="fill sample-datastore/ with MSD Task04 hippocampus MRI")
    sample.add_argument("--studies", type=Path, default=SAMPLE_DATASTORE, help="datastore folder (the project's manifest.json is copied into a new one)")
    sample.set_defaults(func=cmd_sample_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in {"-h", "--help"}:
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    return args.func(args)
