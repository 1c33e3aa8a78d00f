"""Active learning through MONAI Label's REST endpoints: uncertainty scores, ranked strategies, templates that grow."""

import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from semisam_o1.active_learning import (SCORE_KEY, distance_to_labelled, recently_served, uncertain_then_diverse,
                                        uncertainty_score)
from semisam_o1.pool import open_datastore
from test_stage_two import FAST, make_client

UNLABELLED = ["hippocampus_003", "hippocampus_008"]


def test_score_is_taken_over_the_structure_not_the_background():
    label = np.zeros((20, 20, 20), np.uint8)
    label[8:12, 8:12, 8:12] = 1
    uncertainty = np.zeros(label.shape, np.float32)
    uncertainty[8:12, 8:12, 8:12] = 0.8
    small = uncertainty_score(uncertainty, label, threshold=0.3)
    padded = uncertainty_score(np.pad(uncertainty, 20), np.pad(label, 20), threshold=0.3)
    assert small["score"] == pytest.approx(padded["score"])  # more background does not dilute it
    assert small["mean_uncertainty"] > padded["mean_uncertainty"]
    assert small["uncertain_fraction"] == pytest.approx(64 / 8000)


def test_k_center_prefers_the_candidate_farthest_from_labelled_volumes():
    labelled = np.array([[0.0, 0.0], [1.0, 0.0]])
    candidates = np.array([[0.5, 0.1], [5.0, 5.0], [1.0, 1.0]])
    assert distance_to_labelled(candidates, labelled).argmax() == 1
    # no label yet: the most typical volume (closest to the mean) first
    assert distance_to_labelled(candidates, np.zeros((0, 2))).argmax() == 2


def test_uncertain_diverse_is_not_swamped_by_distance():
    """The farthest volume is not served when it is among the least uncertain (the old product of the
    two scaled terms served exactly what ``diverse`` served); among the most uncertain, the farthest wins."""
    scores = [0.50, 0.49, 0.48, 0.47, 0.46, 0.45, 0.44, 0.43]  # one pool's scores differ by a few percent
    distances = np.array([1.0, 3.0, 2.0, 1.5, 1.0, 1.0, 1.0, 9.0])
    values = [v for v, _ in uncertain_then_diverse(scores, distances)]
    assert int(np.argmax(values)) == 1  # the shortlist is the 2 most uncertain; of those the farther
    assert int(np.argmax(distances)) == 7 and int(np.argmax(scores)) == 0  # (neither pure strategy's pick)
    # a larger shortlist reaches farther down the uncertainty ranking
    assert int(np.argmax([v for v, _ in uncertain_then_diverse(scores, distances, fraction=1.0)])) == 7
    # unscored candidates come after every scored one
    assert int(np.argmax([v for v, _ in uncertain_then_diverse([None, 0.1], np.array([9.0, 0.0]))])) == 1


def test_an_image_served_to_another_client_is_skipped_only_within_the_window():
    info = {"strategy": {"uncertain": {"ts": 1000, "client_id": "alice"}}}
    assert recently_served(info, "bob", 600, now=1100)
    assert not recently_served(info, "alice", 600, now=1100)
    assert not recently_served(info, "bob", 600, now=1700)


def score_all(client) -> dict:
    res = client.post("/scoring/uncertainty", params={"run_sync": "true"})
    assert res.status_code == 200, res.text
    return res.json()


def test_scores_are_written_current_and_ranked(tiny_studies, monkeypatch):
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        first = score_all(client)
        assert first["scored"] == 2 and first["version"].startswith("stage1-")
        datastore = open_datastore(tiny_studies)
        scores = {i: datastore.get_image_info(i)[SCORE_KEY] for i in UNLABELLED}
        assert all(s["version"] == first["version"] and s["source"] == "stage1" and 0 <= s["score"] <= 1 for s in scores.values())
        assert SCORE_KEY not in datastore.get_image_info("hippocampus_001")  # labelled: not scored

        again = score_all(client)
        assert again["scored"] == 0 and again["current"] == 2  # nothing recomputed for the same model

        best = max(UNLABELLED, key=lambda i: scores[i]["score"])
        res = client.post("/activelearning/uncertain", json={"client_id": "alice"})
        assert res.status_code == 200, res.text
        assert res.json()["id"] == best
        assert "uncertainty" in res.json()["why"]

        # another annotator does not get alice's image; a third gets nothing (never a labelled image)
        bob = client.post("/activelearning/uncertain", json={"client_id": "bob"}).json()
        assert bob["id"] == next(i for i in UNLABELLED if i != best)
        assert client.post("/activelearning/uncertain", json={"client_id": "carol"}).json() == {}
        # alice asking again gets her own image back
        assert client.post("/activelearning/uncertain", json={"client_id": "alice"}).json()["id"] == best

        diverse = client.post("/activelearning/diverse", json={"client_id": "alice"}).json()
        assert diverse["id"] in UNLABELLED and "farthest" in diverse["why"]
        mixed = client.post("/activelearning/uncertain_diverse", json={"client_id": "alice"}).json()
        assert mixed["id"] in UNLABELLED


def wait_refresh(client, runs: int, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/info/").json()["semisam"]["pseudo_label_refresh"]
        if status["runs"] >= runs and not status["running"]:
            return status
        time.sleep(0.5)
    raise AssertionError(f"stage-one refresh not done after {timeout} s: {status}")


def put_label(client, image_id: str, path, tag: str = "final"):
    with open(path, "rb") as f:
        return client.put("/datastore/label", params={"image": image_id, "tag": tag}, files={"label": (path.name, f)},
                          data={"params": '{"label_info": [{"name": "anterior", "idx": 1}, {"name": "posterior", "idx": 2}]}'})


def test_a_saved_final_label_becomes_a_template_and_changes_stage_one(tiny_studies, sample_source, monkeypatch, tmp_path):
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        before = client.post("/infer/semisam_stage_one", params={"image": "hippocampus_008", "output": "json"}).json()
        assert before["templates"] == ["hippocampus_001"]

        # 3D Slicer sends NRRD: the same physical grid as the image, stored as NIfTI with the image's header
        truth = sitk.ReadImage(str(sample_source.labels / "hippocampus_003.nii.gz"))
        nrrd = tmp_path / "label.nrrd"
        sitk.WriteImage(truth, str(nrrd))
        res = put_label(client, "hippocampus_003", nrrd)
        assert res.status_code == 200, res.text
        assert res.json()["template"] == "hippocampus_003" and res.json()["templates"] == 2
        stored = nib.load(str(tiny_studies / "labels" / "final" / "hippocampus_003.nii.gz"))
        np.testing.assert_array_equal(stored.affine, nib.load(str(tiny_studies / "hippocampus_003.nii.gz")).affine)
        np.testing.assert_array_equal(np.asarray(stored.dataobj), np.asarray(nib.load(str(sample_source.labels / "hippocampus_003.nii.gz")).dataobj))

        status = wait_refresh(client, runs=1)
        assert status["last"] == {"images": 1, "seconds": status["last"]["seconds"], "error": None, "failed": {}}
        datastore = open_datastore(tiny_studies)
        info = datastore.get_label_info(datastore.get_label_by_image_id("hippocampus_008", "pseudo"), "pseudo")
        assert info["templates"] == ["hippocampus_001", "hippocampus_003"]

        after = client.post("/infer/semisam_stage_one", params={"image": "hippocampus_008", "output": "json"}).json()
        assert after["templates"] == ["hippocampus_001", "hippocampus_003"]
        assert after["classes"] != before["classes"]
        # the new template is never offered for labelling again
        for _ in range(3):
            assert client.post("/activelearning/diverse", json={"client_id": "alice"}).json()["id"] == "hippocampus_008"


@pytest.mark.parametrize(
    "make_bad, reason",
    [
        (lambda lab: lab[:-1], "does not match image"),  # wrong shape
        (lambda lab: np.where(lab == 2, 7, lab), "not in the label map"),  # unknown label value
        (lambda lab: np.zeros_like(lab), "empty"),
    ],
)
def test_a_malformed_label_is_refused_and_the_existing_label_kept(tiny_studies, sample_source, monkeypatch, tmp_path, make_bad, reason):
    final = tiny_studies / "labels" / "final" / "hippocampus_001.nii.gz"
    kept = final.read_bytes()
    good = nib.load(str(sample_source.labels / "hippocampus_001.nii.gz"))
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(make_bad(np.asarray(good.dataobj)).astype(np.uint8), good.affine), str(bad))
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        res = put_label(client, "hippocampus_001", bad)
        assert res.status_code == 422, res.text
        assert reason in res.json()["detail"] and "hippocampus_001" in res.json()["detail"]
        assert client.get("/info/").json()["semisam"]["pseudo_label_refresh"]["runs"] == 0
    assert final.read_bytes() == kept


def test_a_label_for_an_unknown_image_is_404(tiny_studies, sample_source, monkeypatch):
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        res = put_label(client, "no_such_case", sample_source.labels / "hippocampus_001.nii.gz")
        assert res.status_code == 404 and "no_such_case" in res.json()["detail"]


def test_quirk_label_of_another_anatomy_is_refused(tiny_studies, sample_source, monkeypatch):
    quirks = sample_source.images.parent.parent / "hippocampus-quirks"
    wrong = quirks / "label_not_hippocampus_512x512x94.nii.gz"
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        res = put_label(client, "hippocampus_003", wrong)
    assert res.status_code == 422 and "shape" in res.json()["detail"]
    assert not (tiny_studies / "labels" / "final" / "hippocampus_003.nii.gz").exists()


def test_stage_one_scores_are_redone_when_the_prior_changes(tiny_studies):
    """A score's version names stage one's settings: a server restarted with another ``--conf registration``,
    ``propagation``, ``fusion_decision`` or feature setting scores the pool again instead of keeping stale scores."""
    from semisam_o1.config import AppConfig
    from semisam_o1.pool import build_stage_one, open_datastore
    from semisam_o1.tasks.uncertainty_scoring import stage_one_version
    from semisam_o1.templates import find_templates

    templates = find_templates(open_datastore(tiny_studies))

    def version(conf):
        return stage_one_version(templates, build_stage_one(tiny_studies, AppConfig.from_conf(conf)).settings())

    confs = [{"stage_one.registration": "demons"}, {"stage_one.registration": "demons+syn"}, {"stage_one.registration": "demons+syn", "stage_one.propagation": "prototype"},
             {"stage_one.registration": "demons+syn", "propagation.decision": "volume"}, {"stage_one.registration": "demons", "stage_one.feature_dims": "16"}]
    versions = {version(c) for c in confs}
    assert len(versions) == 5
    assert version(confs[0]) == version(dict(confs[0]))
