"""``python main.py <command>``: serve (default), sample-data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semisam_o1.config import OPTIONS, AppConfig, ConfError
from semisam_o1.sample_data import SAMPLE_DATASTORE, SampleDataError, load_manifest, populate, verify


def _conf_pairs(pairs: list[list[str]] | None) -> dict[str, str]:
    return {k: v for k, v in (pairs or [])}


def sample_conf(studies: Path) -> dict[str, str]:
    """``--conf labels`` of a datastore that carries a manifest (the sample datastore), else nothing."""
    manifest = studies / "manifest.json"
    if not manifest.exists():
        return {}
    labels = load_manifest(manifest).get("labels", {})
    return {"labels": ",".join(f"{name}={value}" for name, value in labels.items())} if labels else {}


def cmd_serve(args) -> int:
    studies = args.studies
    conf = _conf_pairs(args.conf)
    is_url = str(studies).startswith(("http://", "https://"))
    if not is_url:
        studies = Path(studies)
        if studies.resolve() == SAMPLE_DATASTORE.resolve() and verify(studies):
            print("sample datastore incomplete; filling it first (python main.py sample-data)")
            populate(studies)
        if not studies.is_dir():
            print(f"error: studies folder {studies} does not exist", file=sys.stderr)
            return 2
        conf = {**sample_conf(studies), **conf}
    try:
        AppConfig.from_conf(conf)
    except ConfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from semisam_o1.server import serve

    serve(studies, conf, host=args.host, port=args.port, log_level=args.log_level)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="SemiSAM-O1 Label: one template -> a labelled study pool.")
    sub = parser.add_subparsers(dest="command")

    conf_help = "app option (repeatable): " + "; ".join(f"{k}: {h}" for k, h in OPTIONS)
    serve = sub.add_parser("serve", help="start the MONAI Label server (default command)")
    serve.add_argument("--studies", default=str(SAMPLE_DATASTORE), help="datastore folder or DICOMweb URL")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help=conf_help)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    sample = sub.add_parser("sample-data", help="fill sample-datastore/ with MSD Task04 hippocampus MRI")
    sample.add_argument("--studies", type=Path, default=SAMPLE_DATASTORE, help="datastore folder holding manifest.json")
    sample.set_defaults(func=cmd_sample_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in {"-h", "--help"}:
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    return args.func(args)
