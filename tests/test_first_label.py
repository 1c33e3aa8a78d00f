"""The first label: the ``representative`` strategy names the image to annotate first, from a datastore with no label."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from semisam_o1.cli import main as cli_main
from semisam_o1.representative import (
    Thumbnails,
    aligned_distance,
    coverage_ranking,
    most_representative,
    partners,
    thumbnail,
)
from semisam_o1.volumes import load_image
from test_stage_two import FAST, make_client

POOL = ["hippocampus_001", "hippocampus_003", "hippocampus_008", "hippocampus_017", "hippocampus_026"]


def ball(radius: float, shape=(40, 40, 40), centre=(20, 20, 20)) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2
    return np.where(inside, 100.0, 10.0).astype(np.float32) + np.linspace(0, 1, shape[2], dtype=np.float32)


def write(array: np.ndarray, path: Path, affine=None) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def shell(core: float) -> np.ndarray:
    """A bright ball of radius 10 voxels with a darker core of radius ``core``: no affine map turns one core ratio into another."""
    return ball(10) - (ball(core) - ball(0)) * 0.8


def test_the_medoid_is_served_first_then_the_image_the_labels_cover_worst(tmp_path):
    paths = {f"shell_{r}": write(shell(r), tmp_path / f"shell_{r}.nii.gz") for r in (3, 4, 5, 6)}
    paths["dark_ball"] = write(110.0 - ball(10), tmp_path / "dark_ball.nii.gz")  # the odd one out: another contrast

    ranked = most_representative(paths, "mri")
    assert ranked[0][0] in {"shell_4", "shell_5"}, ranked  # the middle of the shells, never the odd one out
    assert ranked[-1][0] == "dark_ball"
    second = most_representative(paths, "mri", labelled=(ranked[0][0],))
    assert second[0][0] == "dark_ball", second  # with a typical shell labelled, the unlike image gains the pool most
    assert ranked[0][0] not in dict(second)


def test_where_a_scan_is_cut_off_does_not_make_it_typical(tmp_path):
    """Cropped scans of one anatomy, each cut off elsewhere (points outside a scan carry no value), and one of another
    contrast: the pick is one of the anatomy's scans, the other contrast comes last."""
    body = shell(5)
    boxes = {"scan_a": (slice(2, 40), slice(0, 36)), "scan_b": (slice(0, 36), slice(4, 40)), "scan_c": (slice(3, 39), slice(2, 38))}
    paths = {}
    for name, (sz, sy) in boxes.items():
        paths[name] = write(np.ascontiguousarray(body[sz, sy]), tmp_path / f"{name}.nii.gz")
    odd = (110.0 - ball(10))[slice(2, 38), slice(2, 38)]
    paths["other_contrast"] = write(np.ascontiguousarray(odd), tmp_path / "other_contrast.nii.gz")
    ranked = most_representative(paths, "mri")
    assert ranked[0][0] != "other_contrast" and ranked[-1][0] == "other_contrast", ranked


def test_a_thumbnail_does_not_depend_on_orientation_or_voxel_size(tmp_path):
    array = ball(9) + np.linspace(0, 50, 40, dtype=np.float32)[:, None, None]  # not symmetric along D
    plain = load_image(write(array, tmp_path / "plain.nii.gz"))
    flipped_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped_affine[0, 3] = 39.0  # the same world positions, the D axis stored the other way round
    flipped = load_image(write(array[::-1].copy(), tmp_path / "flipped.nii.gz", flipped_affine))
    coarse = load_image(write(array[::2, ::2, ::2].copy(), tmp_path / "coarse.nii.gz", np.diag([2.0, 2.0, 2.0, 1.0])))
    a, b, c = (thumbnail(v, "mri", step_mm=2.0) for v in (plain, flipped, coarse))
    assert np.allclose(a, b, atol=1e-4, equal_nan=True)
    assert np.isnan(a).any() and not np.isnan(a).all()  # outside the 40 mm scan: no value
    assert aligned_distance(a, c) < 0.1
    other = thumbnail(load_image(write(110.0 - array, tmp_path / "inverted.nii.gz")), "mri", step_mm=2.0)
    assert aligned_distance(a, other) > 0.5


def test_a_large_pool_is_compared_with_a_fixed_sample_of_partners():
    assert partners(24) == list(range(24))
    sample = partners(200)
    assert len(sample) == 24 and sample == sorted(set(sample)) and sample == partners(200)  # the same draw every call
    d = np.abs(np.subtract.outer(np.arange(6.0), np.arange(6.0)[[1, 4]]))  # 6 images, 2 partners
    assert coverage_ranking(d, list(range(6)), []) == pytest.approx({i: (abs(i - 1) + abs(i - 4)) / 2 for i in range(6)})


def test_coverage_without_labels_is_the_mean_distance_to_the_pool():
    d = np.array([[0.0, 0.2, 0.9], [0.2, 0.0, 0.8], [0.9, 0.8, 0.0]])
    assert coverage_ranking(d, [0, 1, 2], []) == pytest.approx({0: 1.1 / 3, 1: 1.0 / 3, 2: 1.7 / 3})
    assert coverage_ranking(d, [0, 2], [1]) == pytest.approx({0: 0.8 / 3, 2: 0.2 / 3})


def unlabelled_studies(tmp_path, sample_source) -> Path:
    studies = tmp_path / "studies"
    studies.mkdir()
    for case in POOL:
        shutil.copy(sample_source.images / f"{case}.nii.gz", studies)
    return studies


def test_representative_answers_the_image_to_annotate_first_on_a_datastore_without_labels(tmp_path, sample_source, monkeypatch):
    studies = unlabelled_studies(tmp_path, sample_source)
    expected = most_representative({c: studies / f"{c}.nii.gz" for c in POOL}, "mri")[0][0]
    (studies / "zz_broken.nii.gz").write_bytes(b"not an image")  # put in the folder by hand: never served, no error
    with make_client(studies, monkeypatch, FAST) as client:
        assert "representative" in client.get("/info/").json()["strategies"]
        res = client.post("/activelearning/representative", json={"client_id": "alice"})
        assert res.status_code == 200, res.text
        answer = res.json()
        assert answer["id"] == expected and "annotate it first" in answer["why"], answer
        bob = client.post("/activelearning/representative", json={"client_id": "bob"}).json()
        assert bob["id"] not in {expected, "zz_broken"}  # served to alice a moment ago: bob gets the next best


def test_pipeline_without_a_label_says_which_image_to_annotate_first(tmp_path, sample_source, capsys):
    studies = unlabelled_studies(tmp_path, sample_source)
    expected = most_representative({c: studies / f"{c}.nii.gz" for c in POOL}, "mri", thumbnails=Thumbnails("mri"))[0][0]
    code = cli_main(["pipeline", "--studies", str(studies), "--stage", "1", "--conf", "labels", "anterior=1,posterior=2"])
    err = capsys.readouterr().err
    assert code == 2 and f"annotate {expected} first" in err, err


def test_a_labelled_image_s_pseudo_label_is_scored_against_its_new_final_label(tiny_studies, sample_source, monkeypatch):
    from semisam_o1.config import AppConfig
    from semisam_o1.evaluation import scores
    from semisam_o1.pipeline import run_stage_one
    from semisam_o1.volumes import load_label
    from test_active_learning import put_label, wait_refresh

    run_stage_one(tiny_studies, AppConfig.from_conf(FAST), progress=False)  # pseudo-labels of 003 and 008 from the 1 template
    pseudo = tiny_studies / "labels" / "pseudo" / "hippocampus_003.nii.gz"
    truth = sample_source.labels / "hippocampus_003.nii.gz"
    image = load_image(tiny_studies / "hippocampus_003.nii.gz")
    per_class = scores(load_label(pseudo, image), load_label(truth, image), {"anterior": 1, "posterior": 2})
    expected = round(float(np.mean([round(s["dice"], 4) for s in per_class.values()])), 4)
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        assert client.get("/info/").json()["semisam"]["label_curve"]["points"] == []
        assert put_label(client, "hippocampus_003", truth).status_code == 200
        curve = client.get("/info/").json()["semisam"]["label_curve"]
        assert curve["points"] == [{"labels": 1, "dice": expected, "images": 1}] and curve["expected_gain_next_label"] is None, curve
        wait_refresh(client, runs=1)
        assert put_label(client, "hippocampus_003", truth).status_code == 200  # a correction of the same image adds no point
        assert client.get("/info/").json()["semisam"]["label_curve"]["points"] == curve["points"]
        wait_refresh(client, runs=2)
    saved = tiny_studies / "labels" / "final" / "hippocampus_003.nii.gz"
    assert np.array_equal(nib.load(str(saved)).get_fdata(), nib.load(str(truth)).get_fdata())  # the clinician's label, untouched
