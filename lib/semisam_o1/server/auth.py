"""OpenID Connect authentication under MONAI Label's own role checks.

MONAI Label guards every endpoint with ``Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_*))``; ``RBAC``
asks ``get_current_user`` for the caller, whose MONAI Label 0.8.5 version reads Keycloak's
realm-specific ``public_key`` field. This module replaces only that one dependency (FastAPI's
``dependency_overrides``), so every endpoint keeps MONAI Label's role rule and the same settings:

- ``MONAI_LABEL_AUTH_ENABLE=true``, ``MONAI_LABEL_AUTH_REALM_URI``: the OpenID issuer (a Keycloak realm:
  ``https://<host>/realms/<realm>``). The server reads ``<issuer>/.well-known/openid-configuration``
  (issuer, ``jwks_uri``, ``token_endpoint``) and checks each bearer token's signature against the
  issuer's published keys (PyJWT's ``PyJWKClient``; keys rotated at the issuer are fetched again),
  its ``iss``, its ``exp``/``iat`` and, if ``MONAI_LABEL_AUTH_AUDIENCE`` is set, its ``aud``.
- ``MONAI_LABEL_AUTH_TOKEN_ROLES`` (default ``realm_access#roles``, Keycloak's realm roles; ``#`` walks
  into nested claims, e.g. ``resource_access#<client>#roles``), ``MONAI_LABEL_AUTH_TOKEN_USERNAME`` etc.
- ``MONAI_LABEL_AUTH_ROLE_ADMIN/REVIEWER/ANNOTATOR/USER`` (``monailabel-admin`` ...). Each role includes
  the ones below it (admin > reviewer > annotator > user), as Keycloak's composite roles do in
  MONAI Label's documented realm, so a token that carries only ``monailabel-annotator`` may also
  call the ``user`` endpoints. Changes from MONAI Label (:func:`role_changes`): starting/stopping
  training needs ``reviewer`` (MONAI Label: admin), uploading/deleting model weights ``admin``
  (MONAI Label: annotator), a POST through the DICOMweb proxy (``/proxy/dicom/...``, STOW-RS: e.g. OHIF storing a
  DICOM SEG in the PACS) ``annotator`` (MONAI Label: user), as saving a label.
- ``POST /auth/token`` (3D Slicer's login): the user name and password go to the issuer's token
  endpoint as a password grant (Keycloak: "Direct access grants") for ``MONAI_LABEL_AUTH_CLIENT_ID``,
  with ``MONAI_LABEL_AUTH_CLIENT_SECRET`` if the client is confidential; refused credentials -> 401.
- ``MONAI_LABEL_AUTH_LEEWAY``: seconds of clock difference allowed with the issuer (default 10).
- OHIF's login (authorization code + PKCE at the same issuer): :mod:`semisam_o1.server.ohif_login`.

Answers: no or malformed token, bad signature, wrong issuer/audience, expired -> 401 with
``WWW-Authenticate: Bearer``; a valid token without the endpoint's role -> 403 (MONAI Label's RBAC);
the issuer unreachable -> 503.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from typing import Any

import jwt
import requests
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User, get_current_user

logger = logging.getLogger(__name__)

#: Signature algorithms accepted (asymmetric only: the issuer's public keys verify, nothing shared).
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
DEFAULT_LEEWAY = 10.0


class AuthConfigError(ValueError):
    """The auth settings cannot work (named in the message)."""


def roles_ladder() -> list[str]:
    """MONAI Label's roles, highest first (each includes those after it)."""
    return [
        settings.MONAI_LABEL_AUTH_ROLE_ADMIN,
        settings.MONAI_LABEL_AUTH_ROLE_REVIEWER,
        settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
        settings.MONAI_LABEL_AUTH_ROLE_USER,
    ]


def effective_roles(roles: list[str]) -> list[str]:
    """The token's roles plus every MONAI Label role below the highest one it carries."""
    ladder = roles_ladder()
    out = list(dict.fromkeys(roles))
    for i, role in enumerate(ladder):
        if role in roles:
            out += [r for r in ladder[i + 1:] if r not in out]
    return out


def claim(payload: dict, path: str) -> Any:
    """The value at a ``#``-separated claim path (MONAI Label's ``realm_access#roles``), or None."""
    value: Any = payload
    for key in path.split("#"):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def user_from_claims(payload: dict) -> User:
    roles = claim(payload, settings.MONAI_LABEL_AUTH_TOKEN_ROLES)
    if isinstance(roles, str):
        roles = roles.split()
    roles = [r for r in roles if isinstance(r, str)] if isinstance(roles, list) else []
    return User(
        username=str(payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or payload.get("sub") or ""),
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=effective_roles(roles),
    )


def _leeway() -> float:
    raw = os.environ.get("MONAI_LABEL_AUTH_LEEWAY", "")
    try:
        return float(raw) if raw.strip() else DEFAULT_LEEWAY
    except ValueError:
        raise AuthConfigError(f"MONAI_LABEL_AUTH_LEEWAY={raw!r} is not a number of seconds") from None


def check_settings() -> None:
    """Raise :class:`AuthConfigError` naming the setting if auth is enabled with settings that cannot work."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return
    issuer = settings.MONAI_LABEL_AUTH_REALM_URI
    if not issuer.startswith(("https://", "http://")):
        raise AuthConfigError(f"MONAI_LABEL_AUTH_REALM_URI={issuer!r} is not the http(s) URL of an OpenID issuer (a Keycloak realm)")
    _leeway()


class Unavailable(HTTPException):
    def __init__(self, issuer: str, error: Exception | str):
        super().__init__(status.HTTP_503_SERVICE_UNAVAILABLE, f"identity provider {issuer} unavailable: {error}")


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class OpenIdIssuer:
    """An OpenID issuer read from its discovery document; verifies its access tokens."""

    def __init__(self, issuer: str, timeout: float = 10.0):
        self.issuer = issuer.rstrip("/")
        self.timeout = timeout
        self._lock = threading.Lock()
        self._metadata: dict | None = None
        self._keys: jwt.PyJWKClient | None = None

    def metadata(self) -> dict:
        """The discovery document (fetched once; a failed fetch is retried by the next request)."""
        with self._lock:
            if self._metadata is None:
                url = f"{self.issuer}/.well-known/openid-configuration"
                try:
                    r = requests.get(url, timeout=self.timeout)
                    r.raise_for_status()
                    doc = r.json()
                except (requests.RequestException, ValueError) as e:
                    raise Unavailable(self.issuer, f"cannot read {url} ({e})") from None
                if str(doc.get("issuer", "")).rstrip("/") != self.issuer:
                    raise Unavailable(self.issuer, f"{url} names issuer {doc.get('issuer')!r}, not MONAI_LABEL_AUTH_REALM_URI")
                for key in ("jwks_uri", "token_endpoint"):
                    if not doc.get(key):
                        raise Unavailable(self.issuer, f"{url} has no {key}")
                self._keys = jwt.PyJWKClient(doc["jwks_uri"], timeout=self.timeout)
                self._metadata = doc
            return self._metadata

    def verify(self, token: str) -> dict:
        """The claims of a valid access token; HTTPException 401 (invalid) or 503 (issuer unreachable)."""
        doc = self.metadata()
        audience = os.environ.get("MONAI_LABEL_AUTH_AUDIENCE") or None
        try:
            key = self._keys.get_signing_key_from_jwt(token)
            return jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                issuer=doc["issuer"],
                audience=audience,
                leeway=_leeway(),
                options={"require": ["exp", "iat", "iss"], "verify_aud": audience is not None},
            )
        except jwt.PyJWKClientConnectionError as e:
            raise Unavailable(self.issuer, f"cannot read its signing keys ({e})") from None
        except jwt.ExpiredSignatureError:
            raise unauthorized("access token expired: log in again (POST /auth/token)") from None
        except jwt.PyJWTError as e:
            raise unauthorized(f"invalid access token: {e}") from None

    def password_grant(self, username: str, password: str, scope: str = "") -> dict:
        """The issuer's token response to a password grant for this server's client."""
        data = {"grant_type": "password", "client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID, "username": username, "password": password}
        if os.environ.get("MONAI_LABEL_AUTH_CLIENT_SECRET"):
            data["client_secret"] = os.environ["MONAI_LABEL_AUTH_CLIENT_SECRET"]
        if scope:
            data["scope"] = scope
        endpoint = self.metadata()["token_endpoint"]
        try:
            r = requests.post(endpoint, data=data, timeout=self.timeout)
        except requests.RequestException as e:
            raise Unavailable(self.issuer, f"token endpoint {endpoint}: {e}") from None
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.ok and body.get("access_token"):
            return body
        error = body.get("error") or f"HTTP {r.status_code}"
        if error == "invalid_grant":
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "login failed: the identity provider refused this user name and password", headers={"WWW-Authenticate": "Bearer"})
        if r.status_code >= 500:
            raise Unavailable(self.issuer, f"token endpoint answered {error}")
        # the issuer refuses this server's client: a setup problem, not the user's
        raise HTTPException(
            status.HTTP_502_BAD_GATEWAY,
            f"login failed: the identity provider refused client {settings.MONAI_LABEL_AUTH_CLIENT_ID!r} ({error}: {body.get('error_description', '')}); "
            "check MONAI_LABEL_AUTH_CLIENT_ID / MONAI_LABEL_AUTH_CLIENT_SECRET and that the client allows the password grant (Keycloak: Direct access grants)",
        )


_issuer: OpenIdIssuer | None = None
_issuer_lock = threading.Lock()


def issuer() -> OpenIdIssuer:
    global _issuer
    with _issuer_lock:
        if _issuer is None or _issuer.issuer != settings.MONAI_LABEL_AUTH_REALM_URI.rstrip("/"):
            _issuer = OpenIdIssuer(settings.MONAI_LABEL_AUTH_REALM_URI, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
        return _issuer


bearer = OAuth2PasswordBearer(tokenUrl="/auth/token", auto_error=False)


def current_user(token: str | None = Depends(bearer)) -> User:
    """The caller of a request (replaces MONAI Label's ``get_current_user`` under its ``RBAC``)."""
    if not token:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "not authenticated: send 'Authorization: Bearer <access token>' (log in with POST /auth/token)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user_from_claims(issuer().verify(token))


router = APIRouter()


@router.post("/auth/token", summary="Log in: a password grant at the OpenID issuer")
def login(form: OAuth2PasswordRequestForm = Depends()):
    if not settings.MONAI_LABEL_AUTH_ENABLE:  # MONAI Label's answer when auth is off
        return {"access_token": None, "token_type": None}
    return issuer().password_grant(form.username, form.password, " ".join(form.scopes))


@router.post("/reload", include_in_schema=False)
def reload(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    """MONAI Label's ``/reload`` (drops the app instance), which has no role check of its own: admin only."""
    from monailabel.interfaces.utils.app import clear_cache

    clear_cache()
    return {}


@router.post("/proxy/dicom/{path:path}", include_in_schema=False)
async def proxy_post(request: Request, path: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
    """MONAI Label's DICOMweb proxy for a POST (STOW-RS, e.g. OHIF storing a DICOM SEG in the PACS): annotator,
    as saving a label (MONAI Label: user, the role of its GET on the same function, so the role cannot
    be changed in place as :func:`role_changes` does)."""
    from monailabel.endpoints.proxy import proxy_dicom

    op, slash, rest = path.partition("/")
    if slash and op in ("wado", "qido", "stow"):
        return await proxy_dicom(request, op, rest)
    return await proxy_dicom(request, "", path)


def role_changes() -> list[tuple[Any, set[str], str, str]]:
    """The app's changes to MONAI Label's roles: (router, methods, MONAI Label's role, this app's role)."""
    from monailabel.endpoints import model, train

    return [
        # a reviewer runs a self-training round after checking labels (MONAI Label: admin only)
        (train.router, {"POST", "DELETE"}, settings.MONAI_LABEL_AUTH_ROLE_ADMIN, settings.MONAI_LABEL_AUTH_ROLE_REVIEWER),
        # uploading/deleting model weights: admin, as MONAI Label's own summaries say (its code: annotator);
        # an uploaded checkpoint is unpickled by torch.load
        (model.router, {"PUT", "DELETE"}, settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR, settings.MONAI_LABEL_AUTH_ROLE_ADMIN),
    ]


def install(application) -> None:
    """Use OpenID Connect for every ``RBAC`` of ``application`` (when auth is enabled), with :func:`role_changes`."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return
    application.dependency_overrides[get_current_user] = current_user
    for endpoints, methods, before, after in role_changes():
        for route in endpoints.routes:  # the RBAC objects MONAI Label's endpoints call
            if isinstance(route, APIRoute) and route.methods & methods:
                for dependency in route.dependant.dependencies:
                    if isinstance(dependency.call, RBAC) and dependency.call.roles == before:
                        dependency.call.roles = after


def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class InsecureBind(RuntimeError):
    pass


def check_bind(host: str, insecure: bool = False) -> None:
    """Refuse (:class:`InsecureBind`) to serve a non-loopback address without auth, unless ``insecure``."""
    if settings.MONAI_LABEL_AUTH_ENABLE or insecure or is_loopback(host):
        return
    raise InsecureBind(
        f"refusing to serve on {host} without authentication: anyone who can reach it could read every image, "
        "overwrite labels and start training. Enable OpenID Connect (MONAI_LABEL_AUTH_ENABLE=true, "
        "MONAI_LABEL_AUTH_REALM_URI=<issuer>; README 'Operating the server'), or bind 127.0.0.1 behind an "
        "authenticating reverse proxy, or pass --insecure to accept the risk on a trusted network."
    )
