"""MONAI Label's ``LocalDatastore`` with crash-safe writes: a label file and the datastore's JSON are
either the old or the new one, never half-written.

MONAI Label 0.8.5 copies a saved label over the stored one in place (``shutil.copy``) and rewrites
``datastore_v2.json`` in place: a server killed (``kill -9``, power loss) during either leaves a
truncated file, and a truncated JSON stops the next start. Here both are written to a hidden
temporary file in the same folder (``.<name>.<random>.partial``, which no datastore pattern matches),
flushed to disk and renamed over the old one (``os.replace``, atomic on POSIX), under MONAI Label's
datastore lock as before. Concurrent saves of one image's label are serialised by that lock: the
last one to take it wins, and every reader sees one whole file. Leftover temporary files of an
interrupted save are removed at start.

A rename is a "moved" file event, not "created"/"modified": the server's file watcher (auto reload)
treats a file moved into place like MONAI Label treats a new or modified one, so labels and JSON
written by background job processes are still picked up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

logger = logging.getLogger(__name__)

PARTIAL = ".partial"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(dest: str, write) -> None:
    """``write(tmp_path)``, flush it to disk, rename it over ``dest``; ``dest`` is never partial."""
    folder = os.path.dirname(dest) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dest)}.", suffix=PARTIAL)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class AtomicLocalDatastore(LocalDatastore):
    """``LocalDatastore`` whose ``save_label`` and datastore JSON writes are atomic renames."""

    def __init__(self, datastore_path: str, *args, **kwargs):
        root = Path(datastore_path)
        if root.is_dir():
            with FileLock(str(root / ".lock")):  # saves write their temporary files under this lock
                for stale in [*root.glob(f".*{PARTIAL}"), *root.glob(f"labels/*/.*{PARTIAL}")]:
                    logger.warning(f"removing {stale}: a save interrupted by a crash (the previous file is intact)")
                    stale.unlink(missing_ok=True)
        super().__init__(datastore_path, *args, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:
            handler.on_moved = self._on_moved_event

    def _on_moved_event(self, event):
        """A file renamed into place: the datastore JSON as a modification, a label or image as a new file."""
        if os.fsdecode(event.dest_path) != self._datastore_config_path:
            return self._on_any_event(event)
        if self._ignore_event_config:  # this process's own write
            self._ignore_event_config = False
            return
        self._init_from_datastore_file()

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info) -> str:
        """MONAI Label's ``LocalDatastore.save_label``, with the copy replaced by an atomic rename."""
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        logger.info(f"Saving Label for Image: {image_id}; Tag: {label_tag} => {dest}")
        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            replace_atomically(dest, lambda tmp: shutil.copyfile(label_filename, tmp))
            label_info = dict(label_info or {})
            label_info["ts"] = int(time.time())
            label_info["name"] = name
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id

    def _update_datastore_file(self, lock=True):
        def write():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            replace_atomically(self._datastore_config_path, lambda tmp: Path(tmp).write_text(text))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
