"""A client's mistake is a 4xx naming the thing, never a 500 or a job that fails later (the app in-process)."""

import json

import pytest
from semisam_o1.tasks.self_training import SelfTraining
from test_stage_two import FAST, make_client

POOL = "hippocampus_003"


@pytest.fixture()
def client(tiny_studies, monkeypatch):
    with make_client(tiny_studies, monkeypatch, FAST) as c:
        yield c


@pytest.mark.parametrize(
    "path, detail",
    [
        (f"/infer/nope?image={POOL}", "unknown model 'nope'; known models: semisam_o1, semisam_stage_one"),
        ("/batch/infer/nope", "unknown model 'nope'; known models: semisam_o1, semisam_stage_one"),
        ("/activelearning/nope", "unknown strategy 'nope'; known strategies: diverse, first, random, representative, uncertain, uncertain_diverse"),
        ("/train/nope", "unknown trainer 'nope'; known trainers: semisam_o1"),
        ("/scoring/nope", "unknown scoring method 'nope'; known scoring methods: dice, features, uncertainty"),
    ],
)
def test_unknown_task_is_404_listing_the_known_ones(client, path, detail):
    res = client.post(path)
    assert res.status_code == 404, res.text
    assert res.json()["detail"] == detail
    assert client.get("/train/").status_code == 404 and client.get("/scoring/").status_code == 404  # no job was queued


@pytest.mark.parametrize("params, problem", [("{bad", "params: not valid JSON"), ("[1, 2]", "params: expected a JSON object, got list")])
def test_malformed_infer_params_are_422(client, params, problem):
    res = client.post("/infer/semisam_stage_one", params={"image": POOL, "output": "json"}, data={"params": params})
    assert res.status_code == 422, res.text
    assert res.json()["detail"].startswith(problem)


def test_unknown_image_on_infer_is_404_naming_it(client):
    missing = "image 'hippocampus_999' is not in the datastore"
    res = client.post("/infer/semisam_stage_one", params={"image": "hippocampus_999", "output": "json"})
    assert res.status_code == 404 and res.json()["detail"] == missing
    res = client.post("/infer/semisam_stage_one", params={"image": POOL, "output": "json"}, data={"params": json.dumps({"image": "hippocampus_999"})})
    assert res.status_code == 404 and res.json()["detail"] == missing
    res = client.post("/infer/semisam_stage_one", params={"output": "json"})
    assert res.status_code == 422 and "give the id of a datastore image" in res.json()["detail"]


@pytest.mark.parametrize(
    "options, problem",
    [({"iterations": "x"}, "iterations: 'x' is not an integer"), ({"rounds": 0}, "rounds: '0' is not an integer in [1, 20]"),
     ({"refinement": "magic"}, "refinement: 'magic' is not one of voxel, volume, none")],
)
def test_bad_training_option_is_422_before_the_job_starts(client, options, problem):
    res = client.post("/train/semisam_o1", json=options)
    assert res.status_code == 422, res.text
    assert res.json()["detail"].startswith(f"training option {problem}")
    assert client.get("/train/").status_code == 404  # "No Train Tasks Found": nothing was queued


def test_training_options_parse_like_conf():
    assert SelfTraining.options(None, {"iterations": 4, "rounds": "2", "refinement": "none", "gpus": "all"}) == {
        "iterations": 4, "rounds": 2, "refinement": "none"}


def test_dicom_seg_output_without_dicomweb_is_422_before_inference(client):
    res = client.post("/infer/semisam_stage_one", params={"image": POOL, "output": "dicom_seg"})
    assert res.status_code == 422 and "only with a DICOMweb datastore" in res.json()["detail"]
