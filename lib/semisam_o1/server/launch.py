"""Start MONAI Label with the SemiSAM-O1 app, offline and on loopback by default."""

from __future__ import annotations

import os
from pathlib import Path

from semisam_o1 import PROJECT_ROOT
from semisam_o1.config import is_dicomweb
from semisam_o1.server.jobs import SERVER_PID

APP_DIR = PROJECT_ROOT / "apps" / "semisam_o1"

#: MONAI Label settings this app changes from MONAI Label's defaults, unless the environment sets them.
OFFLINE_DEFAULTS = {
    # MLflow tracking writes runs and may reach a tracking server: opt in with the env variable.
    "MONAI_LABEL_TRACKING_ENABLED": "false",
}


class ServeRefused(RuntimeError):
    """The server will not start as asked (the message says why and what to do)."""


def server_environment(studies: str, conf: dict[str, str], port: int) -> dict[str, str]:
    """Environment variables MONAI Label reads in the server and in its background job subprocesses.

    MONAI Label runs train/scoring/batch-infer jobs as ``python -m monailabel.interfaces.utils.app``
    subprocesses that rebuild the app from these variables, and it reads ``os.environ["PYTHONPATH"]``
    when it spawns them: without it the job thread dies and the job stays SUBMITTED forever.
    """
    import json

    pythonpath = [p for p in [str(PROJECT_ROOT / "lib"), str(APP_DIR), os.environ.get("PYTHONPATH", "")] if p]
    env = {k: os.environ.get(k, v) for k, v in OFFLINE_DEFAULTS.items()}
    # DICOMweb studies: list series of the app's modality, not MONAI Label's default {"Modality": "CT"}
    modality = json.dumps({"Modality": "CT" if conf.get("modality") == "ct" else "MR"})
    env["MONAI_LABEL_DICOMWEB_SEARCH_FILTER"] = os.environ.get("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", modality)
    env.update(
        {
            "MONAI_LABEL_APP_DIR": str(APP_DIR),
            "MONAI_LABEL_STUDIES": studies,
            "MONAI_LABEL_APP_CONF": json.dumps(conf),
            "MONAI_LABEL_SERVER_PORT": str(port),
            "PYTHONPATH": os.pathsep.join(dict.fromkeys(os.pathsep.join(pythonpath).split(os.pathsep))),
            SERVER_PID: str(os.getpid()),  # its jobs end with it (semisam_o1.server.jobs)
        }
    )
    return env


def serve(studies: Path | str, conf: dict[str, str], host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", insecure: bool = False):
    """Run the server in this process until it is stopped (Ctrl-C).

    Args:
        studies: a local datastore folder, or a DICOMweb URL (``http(s)://...``).
        conf: the app's ``--conf`` pairs (see :mod:`semisam_o1.config`).
        insecure: serve a non-loopback ``host`` without authentication (else :class:`ServeRefused`).

    Raises:
        ServeRefused: a non-loopback ``host`` without auth or ``insecure``, or unusable auth settings.
    """
    studies = str(studies) if is_dicomweb(studies) else str(Path(studies).resolve())
    os.environ.update(server_environment(studies, conf, port))

    from monailabel.config import settings  # MONAI Label's settings: the environment and ./.env

    from semisam_o1.server import auth

    try:
        auth.check_settings()
        auth.check_bind(host, insecure=insecure)
    except (auth.AuthConfigError, auth.InsecureBind) as e:
        raise ServeRefused(str(e)) from None
    if settings.MONAI_LABEL_AUTH_ENABLE and not auth.is_loopback(host):
        print(f"authentication: OpenID Connect, issuer {settings.MONAI_LABEL_AUTH_REALM_URI}; serve clients over TLS (a reverse proxy), bearer tokens must not cross a network in clear text")
    if settings.MONAI_LABEL_AUTH_ENABLE and os.environ.get("MONAI_LABEL_AUTH_CLIENT_SECRET") and not os.environ.get("MONAI_LABEL_AUTH_OHIF_CLIENT_ID"):
        print(f"WARNING: OHIF logs in as client {settings.MONAI_LABEL_AUTH_CLIENT_ID!r}, which has a secret (MONAI_LABEL_AUTH_CLIENT_SECRET) a browser "
              "cannot keep: the issuer will refuse OHIF's login; name a public client for OHIF in MONAI_LABEL_AUTH_OHIF_CLIENT_ID")
    if insecure and not auth.is_loopback(host) and not settings.MONAI_LABEL_AUTH_ENABLE:
        print(f"WARNING: serving {host} WITHOUT authentication (--insecure): anyone who reaches it can overwrite labels and start training")

    from monailabel.main import Main  # after the environment: monailabel reads settings at import

    main = Main()
    argv = ["start_server", "--app", str(APP_DIR), "--studies", studies, "--host", host, "--port", str(port)]
    argv += ["--log_level", log_level, "--uvicorn_app", "semisam_o1.server.web:app"]  # MONAI Label's app + OHIF/DICOM SEG fixes
    for key, value in conf.items():
        argv += ["--conf", key, value]
    args = main.args_parser().parse_args(argv)
    main.action_start_server(args)
