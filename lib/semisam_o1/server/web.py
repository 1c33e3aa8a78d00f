"""The ASGI app the server runs: MONAI Label's own, with fixes for OHIF and DICOMweb.

``python main.py serve`` starts uvicorn on ``semisam_o1.server.web:app`` (MONAI Label's ``--uvicorn_app``)
instead of ``monailabel.app:app``:

- ``/ohif-api/``: the server address OHIF's MONAI Label panel uses. It is the whole REST API
  (``/ohif-api/<path>`` answers as ``/<path>``), except that ``/ohif-api/info/`` lists ``labels`` as
  names: the panel of MONAI Label 0.8.5 needs a list there (``all_labels.push``), while this app's
  ``/info/`` keeps the ``{name: value}`` map that 3D Slicer and scripts use.
- ``/ohif/{path}``: MONAI Label 0.8.5 maps ``/`` in the path to ``os.pathsep`` (``:``), so every
  file in a sub-folder (``/ohif/assets/...``) is answered with ``index.html``. Here paths resolve
  inside the OHIF folder (never outside it); unknown paths still get ``index.html`` (OHIF's client
  side routes such as ``/ohif/viewer?StudyInstanceUIDs=...``). ``index.html`` also sets the cookie
  OHIF's MONAI Label panel reads for the server address (``MONAILABEL_SERVER_URL``) to this
  server's ``/ohif-api/``, unless the browser has one, so the panel needs no typing. The files are
  public (OHIF's JavaScript); with authentication on, OHIF logs its user in at the server's OpenID issuer
  and its calls carry the token (:mod:`semisam_o1.server.ohif_login`).
- ``/infer/{model}?output=dicom_seg`` converts with pydicom-seg (:mod:`semisam_o1.server.dicomweb`) instead of
  dcmqi's ``itkimage2segimage``, which is never downloaded; the SEG file is deleted once answered.
- ``GET /model/{model}/bundle`` (admin, as ``GET /model/{model}``): the model's published network as a MONAI Bundle, a
  zip of ``<model>/configs/...`` and ``<model>/models/...`` (:mod:`semisam_o1.stage_two.export`); 409 before any
  training, 404 for a model without a network (stage one).
- With ``MONAI_LABEL_AUTH_ENABLE``: OpenID Connect bearer tokens under MONAI Label's role checks, and
  ``/auth/token`` as a password grant at the issuer (:mod:`semisam_o1.server.auth`).
- Shutdown stops every queued and running background job (:mod:`semisam_o1.server.jobs`).
- Concurrency: MONAI Label 0.8.5's endpoints are ``async def`` functions that do blocking work
  (inference, file I/O, datastore writes) on the event loop, so the server answered one request at a
  time (a listing waited behind every infer). :class:`InWorkerThread` serves each request on a worker
  thread, so requests are served concurrently.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Request
from fastapi.responses import FileResponse, Response
from monailabel.app import app as monailabel_app
from monailabel.config import settings
from monailabel.endpoints import infer as infer_endpoint
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import get_mime_type

from semisam_o1.server import auth, ohif_login

OHIF_DIR = Path(infer_endpoint.__file__).resolve().parent / "static" / "ohif"
SERVER_COOKIE = "MONAILABEL_SERVER_URL"
OHIF_API = "/ohif-api"


def ohif_file(path: str) -> Path | None:
    """The file of the OHIF bundle for a URL path below ``/ohif/``; ``index.html`` for anything else.

    ``None`` (answered 404) for a path no browser sends for a page or a bundle file: an absolute one,
    or one holding a ``..`` segment, a backslash or a NUL byte.
    """
    if path.startswith("/") or "\x00" in path or "\\" in path or ".." in path.split("/"):
        return None
    root = OHIF_DIR.resolve()
    candidate = (root / path).resolve() if path else root
    if candidate.is_file() and candidate.is_relative_to(root):
        return candidate
    return root / "index.html"


router = APIRouter()


@router.get("/ohif/{path:path}", include_in_schema=False)
async def ohif(path: str, request: Request):
    """OHIF's files, without a token (public JavaScript; the studies and the API need one)."""
    login = ohif_login.enabled()
    if login and path == ohif_login.SCRIPT:
        return FileResponse(ohif_login.SCRIPT_FILE, media_type="text/javascript", headers={"Cache-Control": "no-cache"})
    file = ohif_file(path)
    if file is None:
        raise HTTPException(status_code=404, detail=f"{'/ohif/' + path!r}: not a page or file of OHIF")
    if not file.exists():
        raise HTTPException(status_code=404, detail=f"OHIF is not installed with MONAI Label ({OHIF_DIR})")
    if login and file.name in ohif_login.CHANGED and file.parent == OHIF_DIR.resolve():
        # made from the server's auth settings at each request: never cached
        response = Response(ohif_login.served(file), media_type=get_mime_type(str(file)), headers={"Cache-Control": "no-cache"})
    else:
        response = FileResponse(file, media_type=get_mime_type(str(file)))
    root = str(request.base_url)
    # absent, or this server's root (OHIF's own default, whose /info/ the panel cannot read): point it at /ohif-api/
    if file.name == "index.html" and request.cookies.get(SERVER_COOKIE, root) == root:
        # raw header: Starlette would quote the value (it contains '/' and ':'), OHIF would not unquote it
        api = f"{root.rstrip('/')}{OHIF_API}/"
        response.headers.append("set-cookie", f"{SERVER_COOKIE}={api}; Path=/; SameSite=Lax")
    return response


@router.get(f"{OHIF_API}/info/", include_in_schema=False)
async def ohif_info(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
    """``/info/`` with ``labels`` as a list of names ordered by value (what OHIF's panel reads)."""
    from monailabel.endpoints.info import app_info

    info = dict(app_info())
    labels = info.get("labels")
    if isinstance(labels, dict):
        info["labels"] = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
    return info


@router.get("/model/{model}/bundle", summary="[Admin] Download the published network as a MONAI Bundle (zip)")
async def model_bundle(model: str, background_tasks: BackgroundTasks, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
    """The infer task ``model``'s published network as a MONAI Bundle zip (its ``export_bundle``), deleted once sent."""
    import tempfile

    from monailabel.interfaces.utils.app import app_instance
    from monailabel.utils.others.generic import remove_file

    from semisam_o1.stage_two.export import NothingPublished, export_zip

    infers = app_instance()._infers
    if model not in infers:
        raise HTTPException(status_code=404, detail=f"unknown model '{model}' (known: {', '.join(sorted(infers))})")
    task = infers[model]
    if not hasattr(task, "export_bundle"):
        exportable = sorted(name for name, t in infers.items() if hasattr(t, "export_bundle"))
        raise HTTPException(status_code=404, detail=f"model '{model}' has no network to export as a bundle (these have: "
                                                    f"{', '.join(exportable)})")
    archive = Path(tempfile.NamedTemporaryFile(suffix=".zip", delete=False).name)
    try:
        export_zip(task.export_bundle, archive, name=model)
    except NothingPublished as e:
        archive.unlink(missing_ok=True)
        raise HTTPException(status_code=409, detail=str(e)) from None
    except BaseException:
        archive.unlink(missing_ok=True)
        raise
    background_tasks.add_task(remove_file, str(archive))
    return FileResponse(archive, media_type="application/zip", filename=f"{model}_bundle.zip")


class OhifApiPrefix:
    """ASGI wrapper: ``/ohif-api/<path>`` is ``/<path>``, except the routes this module defines there."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(f"{OHIF_API}/") and path != f"{OHIF_API}/info/":
            rest = path[len(OHIF_API):]
            scope = {**scope, "path": rest, "raw_path": rest.encode()}
        await self.application(scope, receive, send)


def _dicom_seg(series_dir, label, label_info, file_ext="*", use_itk=True) -> str:
    """``nifti_to_dicom_seg`` of MONAI Label's infer endpoint, with pydicom-seg (no dcmqi)."""
    import tempfile

    from semisam_o1.server.dicomweb import label_to_seg

    series_dir = Path(series_dir)
    names = {str(info.get("name", f"label_{i + 1}")): int(info.get("idx", i + 1)) for i, info in enumerate(label_info or [])}
    out = Path(tempfile.NamedTemporaryFile(suffix=".dcm", delete=False).name)
    try:
        return str(label_to_seg(label, Path(f"{series_dir}.nii.gz"), series_dir, names, out))
    except BaseException:
        out.unlink(missing_ok=True)  # no answer, no file left behind
        raise


class InWorkerThread:
    """ASGI wrapper: serves each HTTP request on a worker thread, in an event loop of its own.

    The whole request (middleware, body parsing, the role check, the endpoint, sending the response,
    background tasks) runs there, so blocking code in an ``async def`` endpoint blocks only its own
    request; ``receive`` and ``send`` still go through the server's event loop. Threads come from
    AnyIO's worker pool (40 at most, as for FastAPI's own ``def`` endpoints). Paths under
    :data:`ON_EVENT_LOOP` (MONAI Label's DICOMweb proxy, which really awaits) and non-HTTP scopes
    (lifespan, websockets) stay on the server's loop.

    (Wrapping each route's ``app`` instead does not work with FastAPI >= 0.1xx: included routers build
    their own route handlers lazily.)
    """

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").startswith(ON_EVENT_LOOP):
            return await self.application(scope, receive, send)
        loop = asyncio.get_running_loop()

        def on_server_loop(function):
            async def call(*args):
                return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(function(*args), loop))

            return call

        run = lambda: asyncio.run(self.application(scope, on_server_loop(receive), on_server_loop(send)))  # noqa: E731
        await anyio.to_thread.run_sync(run)


#: Path prefixes whose endpoints really await (MONAI Label's DICOMweb proxy over HTTP): on the server's loop.
ON_EVENT_LOOP = ("/proxy/", f"{OHIF_API}/proxy/")


def _send_response(datastore, result, output, background_tasks):
    """MONAI Label's ``send_response``; the DICOM SEG file made for ``output=dicom_seg`` is deleted
    once sent (MONAI Label deletes the label file it answers, never the SEG)."""
    from monailabel.utils.others.generic import remove_file

    seg = result.get("dicom_seg")
    if seg and Path(seg).is_file():
        background_tasks.add_task(remove_file, seg)
    return _send_response.__wrapped__(datastore, result, output, background_tasks)


def install(application) -> None:
    """Put this module's routes before MONAI Label's (Starlette answers with the first match)."""
    before = len(application.router.routes)
    application.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    application.include_router(auth.router, prefix=settings.MONAI_LABEL_API_STR)
    added = application.router.routes[before:]
    del application.router.routes[before:]
    application.router.routes[0:0] = added
    infer_endpoint.nifti_to_dicom_seg = _dicom_seg
    _send_response.__wrapped__ = getattr(infer_endpoint.send_response, "__wrapped__", infer_endpoint.send_response)
    infer_endpoint.send_response = _send_response
    auth.install(application)
    application.router.lifespan_context = _stopping_jobs(application.router.lifespan_context)


def _stopping_jobs(lifespan):
    """MONAI Label's lifespan, then every background job stopped at shutdown (:mod:`semisam_o1.server.jobs`)."""
    from contextlib import asynccontextmanager

    from semisam_o1.server.jobs import stop_background_jobs

    @asynccontextmanager
    async def wrapped(application):
        async with lifespan(application) as state:
            try:
                yield state
            finally:
                stop_background_jobs()

    return wrapped


install(monailabel_app)
app = InWorkerThread(OhifApiPrefix(monailabel_app))
