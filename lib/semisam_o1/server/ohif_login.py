"""OHIF's login: with authentication on, the viewer this server serves logs its user in at the server's issuer.

MONAI Label 0.8.5 ships OHIF 3.10.0-beta.5 (``monailabel/endpoints/static/ohif``), whose OpenID Connect
support is oidc-client-ts 3.1: with ``window.config.oidc`` set and ``response_type: "code"`` it uses the
authorization code flow with PKCE, sends a visitor without a session to the issuer's login page, takes the
code back at ``/ohif/callback``, and from then on OHIF's DICOMweb data source sends ``Authorization:
Bearer <access token>``. This module makes the ``/ohif/`` route (:mod:`semisam_o1.server.web`) use it when
``MONAI_LABEL_AUTH_ENABLE`` is on; the files stay public (OHIF's JavaScript, no study data: every study and
every call of the panel still needs a token), two of them are changed as they are served:

- ``app-config.js``: the shipped file, then ``window.config.oidc = [...]`` (:func:`oidc_config`) built from
  the server's own settings: ``authority`` = ``MONAI_LABEL_AUTH_REALM_URI``; ``client_id`` =
  ``MONAI_LABEL_AUTH_OHIF_CLIENT_ID`` if set, else ``MONAI_LABEL_AUTH_CLIENT_ID``; ``redirect_uri``
  ``/callback`` and ``post_logout_redirect_uri`` ``/``, which OHIF resolves against the page's own address
  (``<server>/ohif/callback`` and ``<server>/ohif/`` as the browser sees the server, e.g. the https address
  of a TLS proxy); ``response_type`` ``code``; ``scope`` :data:`SCOPE`; tokens renewed automatically, not
  revoked at logout (the issuer's session ends).
  It also sets ``routerBasename`` to ``/ohif`` (:data:`ROUTER_BASENAME`: OHIF's own login callback fails with
  the shipped ``/ohif/``).
- ``index.html``: one more script before ``</head>``, ``/ohif/semisam-o1-auth.js`` (``ohif_auth.js`` beside
  this module).

Why the script (found in the shipped bundle, not guessed): the MONAI Label panel of this build
(``extensions/monai-label/src/services/MonaiLabelClient.js``) sends its REST calls (``info/``, ``infer/``,
``datastore/label``, ``activelearning/``, ``train/``) with a bare ``axios`` and no Authorization header, so
with auth on each is answered 401; and OHIF keeps the user object of the login callback
(``userAuthenticationService``) for its DICOMweb headers, so after oidc-client-ts renews the token OHIF
still sends the old one, answered 401 once it expires. The script wraps ``XMLHttpRequest`` (what axios and
dicomweb-client use) and ``fetch`` so that a request to this server's ``/ohif-api/`` or ``/proxy/dicom/``
(same origin only) carries the current token from oidc-client-ts' user store (``sessionStorage``, key
``oidc.user:<authority>:<client_id>``, the same user OHIF logged in). That is the least invasive fix:
nothing of OHIF's bundle is modified (its minified, hash-named files change with every MONAI Label
release), and other requests (the issuer, fonts) are untouched. ``tests/test_ohif_login.py`` sees both
faults in Chromium (the panel's ``info/`` leaves without a token, OHIF's study query with the expired one
of its login) and both requests answered 200.

The client at the issuer must be a *public* client (a browser keeps no secret) that allows the
authorization code flow with PKCE, the redirect URI ``<server>/ohif/callback`` (Keycloak: "Valid redirect
URIs" ``https://<server>/ohif/*``; "Valid post logout redirect URIs" ``+``, the same: OHIF's logout returns
to the page it left) and the web origin ``<server>`` (CORS for the token and userinfo endpoints: OHIF
always reads userinfo with the access token, which Keycloak's endpoint accepts). Keycloak's public client
with "Direct access grants" also serves Slicer's ``/auth/token``; a server whose client is confidential
(with ``MONAI_LABEL_AUTH_CLIENT_SECRET``) names a second, public one for OHIF in
``MONAI_LABEL_AUTH_OHIF_CLIENT_ID``. PKCE needs a secure context: https, or http on loopback.

Without authentication both files are served as shipped, byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from monailabel.config import settings

#: What OHIF asks the issuer for (Keycloak puts the realm roles in the access token by its default scopes).
SCOPE = "openid profile email"
#: URL path below ``/ohif/`` of the script :data:`SCRIPT_FILE`.
SCRIPT = "semisam-o1-auth.js"
SCRIPT_FILE = Path(__file__).with_name("ohif_auth.js")
#: OHIF's ``routerBasename`` with the login: the shipped ``/ohif/`` less its trailing slash. OHIF 3.10's
#: ``OpenIdConnectRoutes`` takes the callback route as ``pathname.replace(routerBasename, '')``, which for
#: ``/ohif/`` leaves ``callback`` where the router says ``/callback``: the callback page then records itself as
#: the page to return to, goes back to itself after the login and fails ("No matching state found in
#: storage"). The basename is used for nothing else (React Router's ``basename``, the same with or without it).
ROUTER_BASENAME = "/ohif"
#: The files of the bundle served changed (their names in the bundle's top folder).
CHANGED = ("index.html", "app-config.js")


def enabled() -> bool:
    return bool(settings.MONAI_LABEL_AUTH_ENABLE)


def client_id() -> str:
    """The client OHIF logs in as: ``MONAI_LABEL_AUTH_OHIF_CLIENT_ID``, else the server's ``MONAI_LABEL_AUTH_CLIENT_ID``."""
    return os.environ.get("MONAI_LABEL_AUTH_OHIF_CLIENT_ID") or settings.MONAI_LABEL_AUTH_CLIENT_ID


def oidc_config() -> dict:
    """OHIF's ``oidc`` entry for this server's issuer and client."""
    return {
        "authority": settings.MONAI_LABEL_AUTH_REALM_URI.rstrip("/"),
        "client_id": client_id(),
        "redirect_uri": "/callback",  # OHIF: <page origin>/ohif/callback
        "post_logout_redirect_uri": "/",  # OHIF: <page origin>/ohif/
        "response_type": "code",  # oidc-client-ts: authorization code + PKCE
        "scope": SCOPE,
        "automaticSilentRenew": True,  # renewed before it expires (with the issuer's refresh token)
        # OHIF's default (true) makes its logout fail at an issuer without a revocation endpoint, or one that
        # cannot revoke JWT access tokens; ending the issuer's session at logout ends its refresh tokens
        "revokeAccessTokenOnSignout": False,
    }


def app_config_js(shipped: str) -> str:
    """The shipped ``app-config.js`` with the login added, and :data:`ROUTER_BASENAME`."""
    return (
        f"{shipped.rstrip()}\n\n// SemiSAM-O1: authentication is on; OHIF logs in at the server's OpenID issuer\n"
        f"window.config.oidc = [{json.dumps(oidc_config(), indent=2)}];\n"
        f"// without the trailing slash, OHIF recognises its login callback page (semisam_o1/server/ohif_login.py)\n"
        f"window.config.routerBasename = {json.dumps(ROUTER_BASENAME)};\n"
    )


def index_html(shipped: str) -> str:
    """The shipped ``index.html`` with :data:`SCRIPT` loaded before OHIF's (deferred) bundle runs."""
    tag = f'<script src="/ohif/{SCRIPT}"></script>'
    if "</head>" in shipped:
        return shipped.replace("</head>", f"{tag}</head>", 1)
    return tag + shipped


def served(file: Path) -> str:
    """The text served for ``file`` (one of :data:`CHANGED`) when authentication is on."""
    text = file.read_text(encoding="utf-8")
    return index_html(text) if file.name == "index.html" else app_config_js(text)
