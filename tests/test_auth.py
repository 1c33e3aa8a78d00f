"""Authentication against a real OpenID Connect provider (npm oidc-provider, tests/oidc/provider.mjs).

The provider plays a hospital's Keycloak realm: discovery, a JWKS, JWT access tokens with the
account's roles in ``realm_access.roles``, and the password grant Slicer's login goes through.
The server runs as ``python main.py serve --host 0.0.0.0`` with MONAI Label's own auth settings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import jwt
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from conftest import Server
from cryptography.hazmat.primitives.asymmetric import rsa
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from semisam_o1 import PROJECT_ROOT
from semisam_o1.distributed import free_port
from test_server import QUIET
from test_slicer_contract import SLICER_INFER, SLICER_LABEL_INFO
from test_stage_two import FAST

pytestmark = pytest.mark.server

OIDC_DIR = Path(__file__).parent / "oidc"
CLIENT = {"client_id": "semisam-o1", "client_secret": "semisam-o1-secret"}
SHORT_CLIENT = {"client_id": "semisam-o1-short", "client_secret": "semisam-o1-short-secret"}  # 3 s tokens


@contextmanager
def openid_provider(*ohif_origins: str):
    """A running oidc-provider (tests/oidc/provider.mjs) on a free loopback port; yields its issuer URL.

    ``ohif_origins`` (``http://127.0.0.1:<port>``): servers whose OHIF may log in (client ``semisam-o1-ohif``).
    """
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed (make test installs it with apt as root: make oidc-deps)")
    if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.fail("oidc-provider is not installed: run `make oidc-deps` (npm ci in tests/oidc)")
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(["node", str(OIDC_DIR / "provider.mjs"), str(free_port()), *ohif_origins], stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            line = process.stdout.readline()
            if not line:
                process.wait(timeout=10)
                stderr.seek(0)
                raise RuntimeError(f"oidc-provider did not start: {stderr.read()}")
            yield json.loads(line)["issuer"]
        finally:
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def oidc_issuer():
    """The issuer URL of a running oidc-provider (stopped after the module)."""
    with openid_provider() as issuer:
        yield issuer


def auth_env(issuer: str) -> dict:
    return {
        **QUIET,
        "MONAI_LABEL_AUTH_ENABLE": "true",
        "MONAI_LABEL_AUTH_REALM_URI": issuer,
        "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT["client_id"],
        "MONAI_LABEL_AUTH_CLIENT_SECRET": CLIENT["client_secret"],
        "MONAI_LABEL_AUTH_LEEWAY": "0",
    }


@pytest.fixture(scope="module")
def auth_server(oidc_issuer, sample_source, tmp_path_factory):
    """The app on a tiny datastore (template hippocampus_001 + 2 images), bound to 0.0.0.0 with auth on."""
    studies = tmp_path_factory.mktemp("auth") / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in ["hippocampus_001", "hippocampus_003", "hippocampus_008"]:
        shutil.copy(sample_source.images / f"{case}.nii.gz", studies)
    shutil.copy(sample_source.labels / "hippocampus_001.nii.gz", studies / "labels" / "final")
    conf = [arg for key, value in FAST.items() for arg in ("--conf", key, value)]
    with Server(studies, "--host", "0.0.0.0", *conf, env=auth_env(oidc_issuer)) as server:
        server.studies = studies
        yield server


def login(server, username: str) -> dict:
    """Slicer's login: MONAI Label's client posts the user name and password to the server's /auth/token."""
    return MONAILabelClient(server.url).auth_token(username, f"{username}-pw")


def bearer(token: dict | str) -> dict:
    return {"Authorization": f"Bearer {token if isinstance(token, str) else token['access_token']}"}


def test_annotator_infers_and_saves_but_cannot_train(auth_server, sample_source, tmp_path):
    client = MONAILabelClient(auth_server.url, tmpdir=str(tmp_path), client_id="slicer-test")
    assert client.auth_enabled()
    with pytest.raises(MONAILabelClientException, match="401"):
        client.auth_token("annotator", "wrong-password")
    client.update_auth(client.auth_token("annotator", "annotator-pw"))
    assert client.auth_valid_token()

    assert client.info()["models"]["semisam_stage_one"]["labels"] == {"anterior": 1, "posterior": 2}  # a 'user' endpoint
    result, _ = client.infer("semisam_stage_one", "hippocampus_003", dict(SLICER_INFER))
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(result)))) == {0, 1, 2}

    corrected = tmp_path / "hippocampus_003.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(sample_source.labels / "hippocampus_003.nii.gz")), str(corrected))
    saved = client.save_label("hippocampus_003", str(corrected), tag="final", params=dict(SLICER_LABEL_INFO))
    assert saved["template"] == "hippocampus_003"
    assert (auth_server.studies / "labels" / "final" / "hippocampus_003.nii.gz").exists()

    with pytest.raises(MONAILabelClientException, match="403"):
        client.train_start("semisam_o1", {"rounds": 1})
    token = bearer(client._headers["Authorization"].split()[1])
    answer = requests.delete(f"{auth_server.url}/datastore/image", params={"id": "hippocampus_008"}, headers=token, timeout=30)
    assert answer.status_code == 403 and "monailabel-admin" in answer.json()["detail"]  # deleting images: admin
    assert (auth_server.studies / "hippocampus_008.nii.gz").exists()
    answer = requests.put(f"{auth_server.url}/model/semisam_o1", files={"file": ("weights.pt", b"not weights")}, headers=token, timeout=30)
    assert answer.status_code == 403 and "monailabel-admin" in answer.json()["detail"]  # model weights: admin


def test_reviewer_and_admin_can_train(auth_server):
    reviewer, annotator, admin = (bearer(login(auth_server, name)) for name in ("reviewer", "annotator", "admin"))
    started = requests.post(f"{auth_server.url}/train/semisam_o1", json={"rounds": 1}, headers=reviewer, timeout=60)
    assert started.status_code == 200, started.text
    stop = requests.delete(f"{auth_server.url}/train/", headers=annotator, timeout=60)
    assert stop.status_code == 403 and "monailabel-reviewer" in stop.json()["detail"]
    assert requests.delete(f"{auth_server.url}/train/", headers=admin, timeout=60).status_code == 200


def test_missing_expired_and_forged_tokens_are_401(auth_server, oidc_issuer):
    url = f"{auth_server.url}/datastore/"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, headers=bearer("not-a-jwt"), timeout=30).status_code == 401
    issued = login(auth_server, "reviewer")["access_token"]
    assert requests.get(url, headers=bearer(issued), timeout=30).status_code == 200

    # the same claims and key id, signed by another key (an attacker's), or unsigned
    header, claims = jwt.get_unverified_header(issued), jwt.decode(issued, options={"verify_signature": False})
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": header["kid"], "typ": "at+jwt"})
    answer = requests.get(url, headers=bearer(forged), timeout=30)
    assert answer.status_code == 401 and "signature" in answer.json()["detail"].lower()
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": header["kid"]})
    assert requests.get(url, headers=bearer(unsigned), timeout=30).status_code == 401
    tampered = jwt.encode({**claims, "realm_access": {"roles": ["monailabel-admin"]}}, other_key, algorithm="RS256", headers={"kid": header["kid"]})
    assert requests.delete(f"{auth_server.url}/datastore/image", params={"id": "hippocampus_008"}, headers=bearer(tampered), timeout=30).status_code == 401

    # a token of the issuer that has expired (client semisam-o1-short: 3 s), valid until then
    token_endpoint = requests.get(f"{oidc_issuer}/.well-known/openid-configuration", timeout=10).json()["token_endpoint"]
    short = requests.post(token_endpoint, data={"grant_type": "password", "username": "reviewer", "password": "reviewer-pw", **SHORT_CLIENT}, timeout=10).json()["access_token"]
    assert requests.get(f"{auth_server.url}/auth/token/valid", headers=bearer(short), timeout=30).status_code == 200
    time.sleep(max(0.0, jwt.decode(short, options={"verify_signature": False})["exp"] - time.time()) + 1.5)
    answer = requests.get(url, headers=bearer(short), timeout=30)
    assert answer.status_code == 401 and "expired" in answer.json()["detail"]
    assert answer.headers["www-authenticate"].startswith("Bearer")


def test_a_valid_token_without_a_role_is_403(auth_server):
    answer = requests.get(f"{auth_server.url}/info/", headers=bearer(login(auth_server, "nobody")), timeout=30)
    assert answer.status_code == 403 and "monailabel-user" in answer.json()["detail"]


#: What answers without a token: the login, whether auth is on, the API description and OHIF's files.
PUBLIC = {("GET", "/auth/"), ("POST", "/auth/token")}


def test_every_endpoint_needs_a_token(auth_server):
    api = requests.get(f"{auth_server.url}/openapi.json", timeout=30).json()
    calls = {(method.upper(), path) for path, item in api["paths"].items() for method in item} - PUBLIC
    calls |= {("POST", "/reload"), ("GET", "/ohif-api/info/"), ("GET", "/ohif-api/datastore/"), ("POST", "/train/"),
              ("GET", "/proxy/dicom/qido/studies"), ("POST", "/proxy/dicom/wado/studies"), ("POST", "/ohif-api/proxy/dicom/studies")}
    assert len(calls) > 40
    opened = {}
    for method, path in sorted(calls):
        answer = requests.request(method, auth_server.url + path.replace("{", "").replace("}", ""), timeout=30)
        if answer.status_code != 401:
            opened[f"{method} {path}"] = answer.status_code
    assert not opened


def test_ohif_files_are_public_and_log_in_at_the_issuer(auth_server, oidc_issuer):
    """OHIF's JavaScript answers without a token; its app-config logs in at the server's issuer (tests/test_ohif_login.py: in a browser)."""
    index = requests.get(f"{auth_server.url}/ohif/", timeout=30)
    assert index.status_code == 200 and '<script src="/ohif/semisam-o1-auth.js"></script></head>' in index.text
    config = requests.get(f"{auth_server.url}/ohif/app-config.js", timeout=30)
    assert config.status_code == 200 and "/proxy/dicom/qido" in config.text
    assert f'"authority": "{oidc_issuer}"' in config.text and '"client_id": "semisam-o1"' in config.text and '"response_type": "code"' in config.text
    script = requests.get(f"{auth_server.url}/ohif/semisam-o1-auth.js", timeout=30)
    assert script.status_code == 200 and "oidc.user:" in script.text
    assert requests.get(f"{auth_server.url}/ohif/assets/favicon-16x16.png", timeout=30).headers["content-type"] == "image/png"
    # a user without a role for a POST through the DICOMweb proxy (a STOW of OHIF): annotator, as saving a label
    answer = requests.post(f"{auth_server.url}/proxy/dicom/wado/studies", data=b"", headers=bearer(login(auth_server, "user")), timeout=30)
    assert answer.status_code == 403 and "monailabel-annotator" in answer.json()["detail"]


def test_non_loopback_bind_needs_auth_or_insecure(tiny_studies):
    port = free_port()
    refused = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "main.py"), "serve", "--studies", str(tiny_studies), "--host", "0.0.0.0", "--port", str(port)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")},
    )
    assert refused.returncode == 2
    assert "refusing to serve on 0.0.0.0 without authentication" in refused.stderr and "--insecure" in refused.stderr
    with Server(tiny_studies, "--host", "0.0.0.0", "--insecure", env=QUIET) as server:
        assert requests.get(f"{server.url}/info/", timeout=30).ok  # no auth: open to the network, as asked
    assert "WITHOUT authentication (--insecure)" in server.log.read_text()


def test_auth_module_units():
    from semisam_o1.server.auth import claim, effective_roles, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")
    assert claim({"realm_access": {"roles": ["a"]}}, "realm_access#roles") == ["a"]
    assert claim({"resource_access": {"app": {"roles": ["b"]}}}, "resource_access#app#roles") == ["b"]
    assert claim({"realm_access": "x"}, "realm_access#roles") is None
    assert effective_roles(["monailabel-reviewer", "other"]) == ["monailabel-reviewer", "other", "monailabel-annotator", "monailabel-user"]
    assert effective_roles(["other"]) == ["other"]
