"""Template-refresh benchmark: a clinician saves a second `final` label on the sample datastore's pool.

    python benchmarks/template_refresh.py [--new hippocampus_003]

The sample datastore's 20 cases (manifest: template hippocampus_001 + 19 unlabelled), laid out over
the stage-one benchmark's work folder (features cached, as after the server's start-up ``features``
job). The label of ``--new`` is saved as ``final`` through the app's :class:`TemplateDatastore`
(validation included), then the app's background refresh runs once and is timed: registration of
the new template to every unlabelled image plus propagation from both templates.
"""

from __future__ import annotations

import json
import shutil
import sys
import time

from common import build_datastore, parser, source_or_exit, write_result
from monailabel.config import settings
from semisam_o1.config import AppConfig
from semisam_o1.pool import build_stage_one
from semisam_o1.sample_data import MANIFEST
from semisam_o1.server.template_datastore import TemplateDatastore
from semisam_o1.tasks.template_refresh import PseudoLabelRefresher
from semisam_o1.templates import find_templates, label_map


def main(argv=None) -> int:
    p = parser(__doc__, "template_refresh", test_split=False)
    p.add_argument("--new", default="hippocampus_003", help="pool image whose ground truth the clinician saves")
    args = p.parse_args(argv)
    source = source_or_exit()
    shared, _ = build_datastore(args.work, source, args.template, None)
    cases = [c["id"] for c in json.loads(MANIFEST.read_text())["cases"]]

    root = args.work.parent / "template-refresh"
    if root.exists():
        shutil.rmtree(root)
    (root / "labels" / "final").mkdir(parents=True)
    for case in cases:
        (root / f"{case}.nii.gz").symlink_to(shared / f"{case}.nii.gz")
    shutil.copy(source.labels / f"{args.template}.nii.gz", root / "labels" / "final")
    (root / ".semisam").symlink_to(shared / ".semisam", target_is_directory=True)

    config = AppConfig.from_conf({"labels": "anterior=1,posterior=2"})
    stage_one = build_stage_one(root, config)
    datastore = TemplateDatastore(str(root), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False,
                                  label_values=lambda: set(config.labels.values()))
    labels = lambda: label_map(find_templates(datastore), config.labels)
    refresher = PseudoLabelRefresher(stage_one, lambda: datastore, labels)
    refresher.request()  # the pool's pseudo-labels from one template, as before the clinician's save
    while refresher.busy():
        time.sleep(0.2)

    start = time.perf_counter()
    datastore.save_label(args.new, str(source.labels / f"{args.new}.nii.gz"), "final", {})
    saved = time.perf_counter() - start
    refresher.request()
    while refresher.busy():
        time.sleep(0.2)
    result = {
        "pool_images": refresher.last["images"],
        "templates": [t.image_id for t in find_templates(datastore)],
        "save_label_seconds": saved,
        "refresh_seconds": refresher.last["seconds"],
        "total_seconds": time.perf_counter() - start,
        "refresh_error": refresher.last["error"],
    }
    write_result(result, args.out, [f"save {saved:.2f} s + refresh of {result['pool_images']} images {result['refresh_seconds']:.1f} s "
                                    f"= {result['total_seconds']:.1f} s with templates {result['templates']}"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
