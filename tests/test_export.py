"""The published stage-two network as a MONAI Bundle: ``main.py export`` and ``GET /model/semisam_o1/bundle`` write it,
and MONAI alone (``python -m monai.bundle run`` in a process where this project cannot be imported) or MONAI Label's
bundle infer task runs it and gets the server's labels (a small network trained on the template, real hippocampus
images, the app in-process)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from semisam_o1.cli import main as cli
from semisam_o1.stage_one.normalize import normalize
from semisam_o1.stage_one.plan import shrink_factors
from semisam_o1.stage_two.export import BUNDLE_FILES, inference_config
from semisam_o1.stage_two.network import image_to_grid, load_network, probs_to_grid, save_network, shrunk_shape
from semisam_o1.stage_two.params import TrainParams
from semisam_o1.stage_two.training import train_network
from semisam_o1.volumes import load_image, load_label
from test_stage_two import FAST, make_client

TEMPLATE = "hippocampus_001"
IMAGES = ["hippocampus_003", "hippocampus_008"]
#: the network's grid limit: hippocampus_003 (61,880 voxels) is predicted on its own grid, hippocampus_008 (69,120)
#: on a grid shrunk 2x per axis, so both of the server's paths are compared
GRID_VOXELS = 65_000
#: what the app serves with (FAST: 16-voxel patches), given to ``main.py export`` as to ``serve``
EXPORT_CONF = ["--conf", "labels", FAST["labels"], "--conf", "train.patch", FAST["train.patch"]]
CLASSES = {"anterior": 1, "posterior": 2}

#: ``python -m monai.bundle ARGS...``, except that importing this project fails and is checked afterwards
MONAI_ALONE = textwrap.dedent("""
    import runpy, sys

    class NotThisProject:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "semisam_o1":
                raise ImportError("the bundle imported semisam_o1")

    sys.meta_path.insert(0, NotThisProject())
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
    assert not [m for m in sys.modules if m.startswith("semisam_o1")]
""")


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 1.0 if not (x.any() or y.any()) else 2.0 * float((x & y).sum()) / float(x.sum() + y.sum())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_source) -> Path:
    """A checkpoint of a small network trained for a few steps on the template and its label. It labels much of each
    image with each class, with many voxels near a tie between two classes: a stricter comparison than a converged
    network's few hundred foreground voxels (the benchmark, benchmarks/export_bundle.py, compares a converged one)."""
    params = TrainParams(patch=(16, 16, 16), iterations=4, channels=(4, 8, 16), seed=0)
    image = load_image(sample_source.images / f"{TEMPLATE}.nii.gz")
    label = load_label(sample_source.labels / f"{TEMPLATE}.nii.gz", image)
    net = train_network([normalize(image.array)], [label], 3, params)
    return save_network(net, 3, tmp_path_factory.mktemp("trained") / "model.pt", params, grid_voxels=GRID_VOXELS)


def publish(studies: Path, checkpoint: Path) -> Path:
    target = studies / ".semisam" / "stage2" / "model.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint, target)
    return target


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_source, trained) -> dict:
    """A datastore (template + the 2 images) with ``trained`` published; the server's labels of the images
    (``POST /infer/semisam_o1``, files ``labels/<id>.nii.gz``) and the bundle ``main.py export`` wrote (``bundle``)."""
    root = tmp_path_factory.mktemp("served")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for case in [TEMPLATE, *IMAGES]:
        shutil.copy(sample_source.images / f"{case}.nii.gz", studies)
    shutil.copy(sample_source.labels / f"{TEMPLATE}.nii.gz", studies / "labels" / "final")
    publish(studies, trained)
    (root / "labels").mkdir()
    with pytest.MonkeyPatch.context() as mp, make_client(studies, mp, FAST) as client:
        for image_id in IMAGES:
            res = client.post("/infer/semisam_o1", params={"image": image_id, "output": "image"})
            assert res.status_code == 200, res.text
            (root / "labels" / f"{image_id}.nii.gz").write_bytes(res.content)
    assert cli(["export", "--studies", str(studies), "--out", str(root / "bundle"), *EXPORT_CONF]) == 0
    return {"studies": studies, "labels": root / "labels", "bundle": root / "bundle"}


def assert_servers_labels(served: dict, labels: dict[str, Path]) -> None:
    """Each file of ``labels`` (image id -> label file) is the server's label of that image: the image's grid and
    affine, Dice >= 0.999 per class."""
    for image_id, path in labels.items():
        image = nib.load(str(served["studies"] / f"{image_id}.nii.gz"))
        server = np.asarray(nib.load(str(served["labels"] / f"{image_id}.nii.gz")).dataobj)
        other = nib.load(str(path))
        assert other.shape == image.shape and np.allclose(other.affine, image.affine), image_id
        assert all((server == v).sum() >= 1000 for v in CLASSES.values()), (image_id, np.bincount(server.ravel()))  # all classes
        scores = {name: dice(np.asarray(other.dataobj), server, v) for name, v in CLASSES.items()}
        assert min(scores.values()) >= 0.999, (image_id, scores)


def test_monai_alone_runs_the_bundle_and_gets_the_servers_labels(served, tmp_path):
    bundle = served["bundle"]
    inference = (bundle / "configs" / "inference.json").read_text()
    assert "semisam" not in inference.lower()  # nothing of this project is named, let alone imported
    data, out, elsewhere = tmp_path / "data", tmp_path / "out", tmp_path / "elsewhere"
    data.mkdir()
    elsewhere.mkdir()
    for image_id in IMAGES:
        shutil.copy(served["studies"] / f"{image_id}.nii.gz", data)
    (elsewhere / "monai_alone.py").write_text(MONAI_ALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "monai_alone.py", "run", "--config_file", str(bundle / "configs" / "inference.json"),
                           "--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(out)],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [f"{i}_seg.nii.gz" for i in IMAGES]
    assert_servers_labels(served, {i: out / f"{i}_seg.nii.gz" for i in IMAGES})


def test_monai_labels_bundle_app_loads_the_bundle_and_gets_the_servers_label(served, tmp_path):
    """What MONAI Label's bundle apps (radiology, monaibundle) do with a bundle folder: its BundleInferTask."""
    from monailabel.tasks.infer.bundle import BundleInferTask

    task = BundleInferTask(str(served["bundle"]), conf={})
    assert task.is_valid() and task.labels == CLASSES
    image_id = IMAGES[1]  # the one on the shrunk grid
    path, _ = task({"image": str(served["studies"] / f"{image_id}.nii.gz"), "device": "cpu"})
    shutil.move(path, tmp_path / "label.nii.gz")
    assert_servers_labels(served, {image_id: tmp_path / "label.nii.gz"})


def test_export_command_writes_the_bundle_files_and_metadata_and_refuses_without_a_network(served, tmp_path, capsys):
    bundle = served["bundle"]
    assert all((bundle / f).is_file() for f in BUNDLE_FILES)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["label_map"] == CLASSES
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "anterior", "2": "posterior"}
    assert meta["intensity_normalisation"]["modality"] == "mri" and meta["intensity_normalisation"]["lower"] == 0.5
    assert meta["spacing"]["median_spacing_mm"] == [1.0, 1.0, 1.0] and meta["spacing"]["grid_voxels"] == GRID_VOXELS
    assert meta["inference"]["patch"] == [16, 16, 16] and meta["inference"]["flip_axes"] == [0, 1, 2]

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert cli(["export", "--studies", str(empty), "--out", str(tmp_path / "bundle")]) == 1
    assert "no stage-two network is published yet" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists() and not (empty / ".semisam").exists()  # nothing written, nothing planned


def test_the_bundles_grid_and_normalisation_are_the_servers_for_ct_and_anisotropic_scans(tmp_path):
    """The config's own expressions and transforms (parsed by MONAI) against the server's functions, where the
    hippocampus images above do not go: CT windowing, thick slices, several shrink factors."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    rng = np.random.default_rng(0)
    checkpoint = {"n_classes": 3, "channels": [4, 8], "dropout": 0.1, "flip_axes": [0, 1, 2]}
    for grid in (None, 10_000, 1_000_000):
        config = ConfigParser(inference_config({**checkpoint, "grid_voxels": grid}, (16, 16, 16), "ct"))
        shrink = config.get_parsed_content("shrink_factors")
        for _ in range(200):
            shape = [int(n) for n in rng.integers(4, 400, 3)]
            spacing = [float(np.float32(s)) for s in rng.choice([0.3, 0.625, 0.8, 1.0, 1.25, 2.5, 3.0, 5.0, 7.7], 3)]
            assert tuple(shrink(shape, spacing)) == shrink_factors(shape, spacing, grid), (shape, spacing, grid)

    config = ConfigParser(inference_config({**checkpoint, "grid_voxels": 20_000}, (16, 16, 16), "ct"))
    path = tmp_path / "ct.nii.gz"
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    nib.save(nib.Nifti1Image(rng.integers(-1024, 1500, (61, 50, 17)).astype(np.int16), affine), str(path))
    data = Compose(config.get_parsed_content("preprocessing").transforms)({"image": str(path)})
    image = load_image(path)
    grid_shape = shrunk_shape(image.array.shape, shrink_factors(image.array.shape, image.spacing, 20_000))
    assert grid_shape != image.array.shape  # (31, 25, 17): the thick axis stays whole
    np.testing.assert_array_equal(data["image"][0].numpy(), image_to_grid(normalize(image.array, "ct"), grid_shape))

    prob = torch.softmax(torch.as_tensor(rng.normal(size=(3, *grid_shape)), dtype=torch.float32), 0)
    back = config.get_parsed_content("to_image_grid")({"image": data["image"], "pred": prob})["pred"]
    np.testing.assert_array_equal(back.numpy(), probs_to_grid(prob.numpy(), image.array.shape))


def test_bundle_download_is_a_zip_of_the_published_network_409_before_training(tiny_studies, trained, monkeypatch, tmp_path):
    import tempfile

    import semisam_o1.server.web  # noqa: F401  (the server's routes, as `main.py serve` installs them)

    scratch = tmp_path / "server-tmp"  # the server's temporary folder: the zip is deleted once sent
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        before = client.get("/model/semisam_o1/bundle")
        assert before.status_code == 409 and "no stage-two network is published yet" in before.json()["detail"], before.text
        assert client.get("/model/semisam_stage_one/bundle").status_code == 404  # stage one has no network
        assert client.get("/model/nonexistent/bundle").status_code == 404

        publish(tiny_studies, trained)
        res = client.get("/model/semisam_o1/bundle")
        assert list(scratch.iterdir()) == []
    assert res.status_code == 200 and res.headers["content-type"] == "application/zip", res.text
    archive = zipfile.ZipFile(io.BytesIO(res.content))
    assert sorted(archive.namelist()) == sorted(f"semisam_o1/{f}" for f in BUNDLE_FILES)
    assert json.loads(archive.read("semisam_o1/configs/metadata.json"))["label_map"] == CLASSES

    net = load_network(trained)
    weights = torch.load(io.BytesIO(archive.read("semisam_o1/models/model.pt")), weights_only=True)
    assert weights.keys() == net.state_dict().keys() and all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    scripted = torch.jit.load(io.BytesIO(archive.read("semisam_o1/models/model.ts")))
    extra = {"metadata.json": "", "inference.json": ""}  # what MONAI Deploy reads from the TorchScript file
    torch.jit.load(io.BytesIO(archive.read("semisam_o1/models/model.ts")), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["label_map"] == CLASSES and "network_def" in json.loads(extra["inference.json"])
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
