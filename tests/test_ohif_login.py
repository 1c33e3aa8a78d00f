"""OHIF's login with authentication on (:mod:`semisam_o1.server.ohif_login`).

The served files are checked without a server; then headless Chromium logs in to the OHIF viewer of a real
server (``--studies`` a real Orthanc, ``MONAI_LABEL_AUTH_ENABLE``) at a real OpenID provider (npm
oidc-provider, tests/oidc/provider.mjs, public client ``semisam-o1-ohif``: authorization code + PKCE) through
its login form: an annotator opens a study (DICOMweb through the server's proxy, with OHIF's token), runs stage
one from the MONAI Label panel, outlives the token of the login (70 s, renewed by OHIF) and saves a label; a
``user`` logs in, is refused the save and a STOW through the proxy (403), and logs out. Screenshots and the
browser console go to tests/artifacts/ohif_login_*.
"""

from __future__ import annotations

import json
import re
import time

import jwt
import pytest
from conftest import Server
from orthanc_harness import SHARED_DICOM, missing_binaries
from semisam_o1.distributed import free_port
from test_auth import openid_provider
from test_dicomweb import ARTIFACTS, FAST, NO_INTERNET, browser, coloured_pixels, hide_banner, pacs, seg_series, viewport_rects  # noqa: F401 (fixtures)
from test_server import QUIET

OHIF_CLIENT = "semisam-o1-ohif"


# ---- the files OHIF gets, without a server ---------------------------------------------------------
@pytest.fixture
def ohif_route(monkeypatch):
    """A client of the ``/ohif/`` route alone, and a switch for MONAI Label's auth setting."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from semisam_o1.server import web

    application = FastAPI()
    application.include_router(web.router)

    def auth(on: bool, issuer: str = "https://keycloak.hospital.test/realms/monailabel/", client: str = "monailabel-app"):
        monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", on)
        monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", issuer)
        monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_CLIENT_ID", client)

    return TestClient(application), auth, web.OHIF_DIR


def oidc_entry(app_config: str) -> dict:
    """The ``window.config.oidc`` entry appended to app-config.js."""
    return json.loads(re.search(r"^window\.config\.oidc = (\[.*?\]);$", app_config, re.DOTALL | re.MULTILINE).group(1))[0]


def test_without_auth_ohif_files_are_served_as_shipped(ohif_route):
    client, auth, bundle = ohif_route
    auth(False)
    assert client.get("/ohif/app-config.js").content == (bundle / "app-config.js").read_bytes()
    assert client.get("/ohif/").content == (bundle / "index.html").read_bytes()
    assert client.get("/ohif/viewer").content == (bundle / "index.html").read_bytes()
    assert client.get("/ohif/semisam-o1-auth.js").content == (bundle / "index.html").read_bytes()  # no such file: a page


def test_with_auth_ohif_logs_in_at_the_servers_issuer(ohif_route, monkeypatch):
    client, auth, bundle = ohif_route
    auth(True)
    config = client.get("/ohif/app-config.js")
    assert config.status_code == 200 and config.headers["cache-control"] == "no-cache"
    assert config.text.startswith((bundle / "app-config.js").read_text().rstrip())  # OHIF's own settings kept
    assert oidc_entry(config.text) == {
        "authority": "https://keycloak.hospital.test/realms/monailabel", "client_id": "monailabel-app",
        "redirect_uri": "/callback", "post_logout_redirect_uri": "/", "response_type": "code", "scope": "openid profile email",
        "automaticSilentRenew": True, "revokeAccessTokenOnSignout": False,
    }
    assert config.text.rstrip().endswith('window.config.routerBasename = "/ohif";')  # OHIF finds its callback page
    for page in ("/ohif/", "/ohif/viewer", "/ohif/callback"):
        html = client.get(page).text
        assert html.count('<script src="/ohif/semisam-o1-auth.js"></script>') == 1
        assert html.index("semisam-o1-auth.js") > html.index("/ohif/app-config.js")  # after window.config is set
    script = client.get("/ohif/semisam-o1-auth.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"] and "oidc.user:" in script.text

    monkeypatch.setenv("MONAI_LABEL_AUTH_OHIF_CLIENT_ID", "ohif-public")  # the server's client is confidential
    assert oidc_entry(client.get("/ohif/app-config.js").text)["client_id"] == "ohif-public"


# ---- in a browser: Orthanc, the server, the OpenID provider, Chromium ---------------------------------
def in_browser(test):
    """Marks of the browser tests: real processes; skipped only without Orthanc or the DICOM data (chromium and
    node: the ``browser`` fixture and :func:`~test_auth.openid_provider` skip, saying so)."""
    for mark in [
        pytest.mark.server,
        pytest.mark.skipif(bool(missing_binaries()), reason=f"Orthanc missing: {', '.join(missing_binaries())} (CI installs them: make system-deps)"),
        pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"no DICOM test data at {SHARED_DICOM}"),
    ]:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def login_server(pacs):  # noqa: F811
    """The app on Orthanc with authentication on (client ``semisam-o1-ohif``) and its template saved as DICOM SEG."""
    from monailabel.client import MONAILabelClient

    port = free_port()
    with openid_provider(f"http://127.0.0.1:{port}") as issuer:
        env = {
            **QUIET, **NO_INTERNET,
            "MONAI_LABEL_DICOMWEB_USERNAME": pacs.orthanc.auth[0],
            "MONAI_LABEL_DICOMWEB_PASSWORD": pacs.orthanc.auth[1],
            "MONAI_LABEL_DATASTORE_CACHE_PATH": str(pacs.work / "cache-login"),
            "MONAI_LABEL_AUTH_ENABLE": "true",
            "MONAI_LABEL_AUTH_REALM_URI": issuer,
            "MONAI_LABEL_AUTH_CLIENT_ID": OHIF_CLIENT,  # public: OHIF's code flow and Slicer's password grant
            "MONAI_LABEL_AUTH_LEEWAY": "0",
        }
        with Server(pacs.orthanc.dicomweb, *FAST, env=env, log_dir=pacs.work, port=port) as running:
            client = MONAILabelClient(running.url)
            client.update_auth(client.auth_token("annotator", "annotator-pw"))
            client.save_label(pacs.template, str(pacs.label), tag="final")
            running.issuer = issuer
            yield running


class Ohif:
    """The steps of a person in OHIF, for one Chromium session."""

    def __init__(self, driver, server, name: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.server, self.name = driver, server, name
        self.wait = WebDriverWait(driver, 120, poll_frequency=0.5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def shot(self, step: str) -> bytes:
        png = self.driver.get_screenshot_as_png()
        (ARTIFACTS / f"ohif_login_{self.name}_{step}.png").write_bytes(png)
        return png

    def find(self, xpath: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self.wait.until(ec.presence_of_element_located((By.XPATH, xpath)))

    def click(self, xpath: str):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        element = self.wait.until(ec.element_to_be_clickable((By.XPATH, xpath)))
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()
        return element

    def log_in(self, username: str) -> dict:
        """Open OHIF, be sent to the issuer's login form, log in; back on OHIF's study list. Returns the token's claims."""
        self.driver.get(f"{self.server.url}/ohif/")
        self.find("//input[@id='username']")
        assert self.driver.current_url.startswith(f"{self.server.issuer}/interaction/"), self.driver.current_url
        self.shot("1_login_form")
        self.find("//input[@id='username']").send_keys(username)
        self.find("//input[@id='password']").send_keys(f"{username}-pw")
        self.click("//button[@id='login']")
        self.find("//*[contains(text(), 'Avasarala')]")  # the study list: QIDO through the server's proxy, with the token
        assert self.driver.current_url.startswith(f"{self.server.url}/ohif"), self.driver.current_url  # back from the issuer
        self.shot("2_study_list")
        return self.claims()

    def access_token(self) -> str:
        """The access token oidc-client-ts holds now (OHIF's login, renewed)."""
        stored = self.driver.execute_script(f"return sessionStorage.getItem('oidc.user:{self.server.issuer}:{OHIF_CLIENT}')")
        assert stored, "oidc-client-ts stored no user"
        return json.loads(stored)["access_token"]

    def claims(self) -> dict:
        return jwt.decode(self.access_token(), options={"verify_signature": False})

    def record_authorization(self):
        """From now on, note the Authorization header OHIF's own code sets on each XMLHttpRequest (beneath: the server's script)."""
        self.driver.execute_script(RECORD_AUTHORIZATION)

    def recorded_authorization(self, path: str) -> list[str | None]:
        """The Authorization header OHIF set on each XMLHttpRequest to ``path`` since :meth:`record_authorization`."""
        return [value for url, value in self.driver.execute_script("return window.testRequests") if url.startswith(path)]

    def statuses(self, since: float, path: str) -> list[int]:
        """HTTP statuses of the page's requests (fetch, XMLHttpRequest) to ``path`` since ``performance.now()`` was ``since``."""
        return self.driver.execute_script(
            "return performance.getEntriesByType('resource').filter(e => e.startTime > arguments[0] && new URL(e.name).pathname.startsWith(arguments[1]))"
            ".map(e => e.responseStatus)", since, path)

    def fetch(self, script: str) -> dict:
        """Run ``script`` (an async function body using ``fetch``, returning a value) in the page."""
        return self.driver.execute_async_script(
            f"const done = arguments[arguments.length - 1]; (async () => {{ {script} }})().then(done, e => done({{error: String(e)}}));"
        )


#: In the page: wraps XMLHttpRequest over the server's script, noting (path, Authorization header OHIF set).
RECORD_AUTHORIZATION = """
window.testRequests = [];
const open = XMLHttpRequest.prototype.open, setRequestHeader = XMLHttpRequest.prototype.setRequestHeader, send = XMLHttpRequest.prototype.send;
XMLHttpRequest.prototype.open = function (method, url) { this.testNote = [new URL(url, location.href).pathname, null]; return open.apply(this, arguments); };
XMLHttpRequest.prototype.setRequestHeader = function (name, value) {
  if (name.toLowerCase() === 'authorization') this.testNote[1] = value;
  return setRequestHeader.apply(this, arguments);
};
XMLHttpRequest.prototype.send = function () { window.testRequests.push(this.testNote); return send.apply(this, arguments); };
"""


def wait_for(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.5)


#: In the page: stage one's label of a series (no token added here: the page's fetch adds it), then saved as final.
SAVE_AS_FINAL = """
const series = SERIES;
const form = new FormData();
form.append('params', JSON.stringify({}));
const inferred = await fetch('/ohif-api/infer/semisam_stage_one?image=' + series + '&output=image', {method: 'POST', body: form});
const label = inferred.ok ? await inferred.blob() : new Blob(['not inferred']);
const upload = new FormData();
upload.append('params', JSON.stringify({label_info: [{name: 'anterior', idx: 1}, {name: 'posterior', idx: 2}]}));
upload.append('label', label, 'label.nii.gz');
const saved = await fetch('/ohif-api/datastore/label?image=' + series + '&tag=final', {method: 'PUT', body: upload});
return {infer: inferred.status, save: saved.status, body: await saved.text()};
"""


@in_browser
def test_annotator_logs_in_runs_stage_one_and_saves_a_label(pacs, login_server, browser):  # noqa: F811
    from selenium.webdriver.support.ui import Select

    started = time.monotonic()
    ohif = Ohif(browser, login_server, "annotator")
    try:
        claims = ohif.log_in("annotator")
        assert claims["preferred_username"] == "annotator" and claims["realm_access"]["roles"] == ["monailabel-annotator"]
        assert claims["client_id"] == OHIF_CLIENT
        login_token = ohif.access_token()

        # a study in the viewer: OHIF's DICOMweb requests through the server's proxy
        ohif.click("//*[contains(text(), 'Avasarala')]")
        ohif.click("//button[contains(., 'MONAI Label')]")
        url_input = ohif.find("//input[@id='monailabelServerURL']")
        assert url_input.get_attribute("value") == f"{login_server.url}/ohif-api/"
        hide_banner(browser)
        wait_for(lambda: viewport_rects(browser), "cornerstone viewport canvas (the series did not load)", timeout=60)
        time.sleep(2)  # the images render
        canvases = viewport_rects(browser)
        before = ohif.shot("3_viewer")

        # stage one from the MONAI Label panel: its own axios calls (info/, infer/)
        ohif.click("//input[@id='monailabelServerURL']/ancestor::tr//button")
        ohif.click("//label[contains(., 'Auto-Segmentation')]")
        Select(ohif.find("//select[option[@value='semisam_stage_one']]")).select_by_value("semisam_stage_one")
        ohif.click("//button[@title='Run Segmentation']")
        ohif.find("//*[contains(text(), 'Running Segmentation - Successful')]")
        time.sleep(6)  # the labelmap renders; the success notification (4 s) goes
        after = ohif.shot("4_stage_one")
        assert coloured_pixels(after, canvases) > coloured_pixels(before, canvases) + 500, "no segmentation overlay appeared"

        # the token of the login expires (70 s; the server allows no leeway here): OHIF keeps sending it,
        # oidc-client-ts has renewed it, and every call below must carry the renewed one
        time.sleep(max(0.0, claims["exp"] + 1 - time.time()))
        ohif.record_authorization()
        since = browser.execute_script("return performance.now()")
        ohif.click("//input[@id='monailabelServerURL']/ancestor::tr//button")  # the panel connects again: axios, info/
        wait_for(lambda: ohif.statuses(since, "/ohif-api/info/"), "the panel's info/ request")
        assert set(ohif.statuses(since, "/ohif-api/info/")) == {200}
        assert set(ohif.recorded_authorization("/ohif-api/info/")) == {None}  # the panel sends no token: the server's script adds it

        # saving a label (this OHIF build's panel has no save button): the page's fetch, with the token it adds
        before_segs = set(seg_series(pacs.orthanc))
        answer = ohif.fetch(SAVE_AS_FINAL.replace("SERIES", json.dumps(pacs.target)))
        assert answer.get("infer") == 200 and answer.get("save") == 200, answer
        new_segs = {uid: image for uid, image in seg_series(pacs.orthanc).items() if uid not in before_segs}
        assert list(new_segs.values()) == [pacs.target]  # a DICOM SEG of the series, stored in Orthanc

        # back to the study list: OHIF's own QIDO request (its data source, its header), after its token expired
        since = browser.execute_script("return performance.now()")
        browser.back()
        wait_for(lambda: ohif.statuses(since, "/proxy/dicom/qido/studies"), "study list query")
        assert set(ohif.statuses(since, "/proxy/dicom/qido/studies")) == {200}
        ohif.find("//*[contains(text(), 'Avasarala')]")
        # OHIF sent the expired token of its login: the server's script put the renewed one in its place
        assert set(ohif.recorded_authorization("/proxy/dicom/qido/studies")) == {f"Bearer {login_token}"}
        renewed = ohif.claims()
        assert renewed["jti"] != claims["jti"] and renewed["realm_access"]["roles"] == ["monailabel-annotator"]
    finally:
        (ARTIFACTS / "ohif_login_annotator_console.log").write_text("\n".join(str(e) for e in browser.get_log("browser")))
    assert "Infer Request: {'model': 'semisam_stage_one'" in login_server.log.read_text()
    assert time.monotonic() - started < 240


@in_browser
def test_user_role_logs_in_cannot_save_and_logs_out(pacs, login_server, browser):  # noqa: F811
    ohif = Ohif(browser, login_server, "user")
    try:
        claims = ohif.log_in("user")
        assert claims["realm_access"]["roles"] == ["monailabel-user"]
        answer = ohif.fetch("""
            const info = await fetch('/ohif-api/info/');
            const upload = new FormData();
            upload.append('params', '{}');
            upload.append('label', new Blob(['x']), 'label.nii.gz');
            const saved = await fetch('/ohif-api/datastore/label?image=SERIES&tag=final', {method: 'PUT', body: upload});
            const stow = await fetch('/proxy/dicom/wado/studies', {method: 'POST', body: new Blob(['x'])});
            return {info: info.status, save: saved.status, detail: (await saved.json()).detail, stow: stow.status};
        """.replace("SERIES", pacs.target))

        # logging out (the study list's menu): the issuer ends the session, OHIF asks for the login again
        ohif.click("//button[@aria-haspopup='menu']")
        ohif.click("//*[@role='menuitem'][contains(., 'Logout')]")
        ohif.click("//button[@name='logout'][@value='yes']")  # the test provider asks to confirm (Keycloak: not with id_token_hint)
        ohif.find("//input[@id='username']")
        assert browser.current_url.startswith(f"{login_server.issuer}/interaction/"), browser.current_url
        assert not browser.execute_script(f"return sessionStorage.getItem('oidc.user:{login_server.issuer}:{OHIF_CLIENT}')")
        ohif.shot("3_logged_out")
    finally:
        (ARTIFACTS / "ohif_login_user_console.log").write_text("\n".join(str(e) for e in browser.get_log("browser")))
    assert answer.get("info") == 200, answer  # a user reads, with the token the page adds
    assert answer["save"] == 403 and "monailabel-annotator" in answer["detail"], answer
    assert answer["stow"] == 403, answer  # nor may OHIF store into the PACS through the proxy

