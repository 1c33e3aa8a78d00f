"""Stage one on real hippocampus volumes: propagation quality, REST infer, caches, bad templates."""

import json

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from semisam_o1.config import AppConfig
from semisam_o1.pipeline import run_stage_one
from semisam_o1.pool import build_stage_one, open_datastore
from semisam_o1.templates import find_templates
from semisam_o1.volumes import load_image
from test_stage_two import FAST, make_client


def dice(a, b, value):
    x, y = a == value, b == value
    return 2 * (x & y).sum() / (x.sum() + y.sum())


def test_propagation_on_real_volumes_is_far_above_chance(tiny_studies, sample_source):
    """The default prior (demons and ANTs SyN, both mappings checked against the features) on real volumes."""
    config = AppConfig.from_conf({k: v for k, v in FAST.items() if k != "stage_one.registration"})
    assert config.stage_one_params().registration == "demons+syn"
    stage_one = build_stage_one(tiny_studies, config)
    templates = find_templates(open_datastore(tiny_studies))
    for case in ["hippocampus_003", "hippocampus_008"]:
        prediction = stage_one.predict(tiny_studies / f"{case}.nii.gz", templates)
        truth = np.asarray(nib.load(str(sample_source.labels / f"{case}.nii.gz")).dataobj)
        scores = [dice(prediction.label, truth, v) for v in (1, 2)]
        assert min(scores) > 0.5, scores  # chance (random voxels at the classes' frequency) is < 0.05
        assert prediction.confidence.shape == truth.shape
        assert 0.0 <= prediction.confidence.min() and prediction.confidence.max() <= 1.0
        assert set(prediction.mappings) == {"hippocampus_001:demons", "hippocampus_001:syn"}
        assert any(m["used"] for m in prediction.mappings.values())
        assert all(0.0 < m["consistency"] <= 1.0 for m in prediction.mappings.values())


def test_infer_from_cache_never_builds_the_encoder(tiny_studies):
    config = AppConfig.from_conf(FAST)
    templates = find_templates(open_datastore(tiny_studies))
    build_stage_one(tiny_studies, config).predict(tiny_studies / "hippocampus_003.nii.gz", templates)
    fresh = build_stage_one(tiny_studies, config)
    fresh.predict(tiny_studies / "hippocampus_003.nii.gz", templates)
    assert fresh.cache._encoder is None


def test_rest_infer_returns_label_in_image_geometry_as_nrrd(tiny_studies, monkeypatch):
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        info = client.get("/info/").json()
        assert info["models"]["semisam_stage_one"]["type"] == "segmentation"
        params = {"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "user-xyz"}
        res = client.post("/infer/semisam_stage_one", params={"image": "hippocampus_003", "output": "image"}, data={"params": json.dumps(params)})
        assert res.status_code == 200, res.text
        out = tiny_studies.parent / "result.nrrd"
        out.write_bytes(res.content)
        got, ref = sitk.ReadImage(str(out)), sitk.ReadImage(str(tiny_studies / "hippocampus_003.nii.gz"))
        assert got.GetSize() == ref.GetSize() and got.GetOrigin() == ref.GetOrigin()
        assert got.GetSpacing() == ref.GetSpacing() and got.GetDirection() == ref.GetDirection()
        assert set(np.unique(sitk.GetArrayFromImage(got))) == {0, 1, 2}

        body = client.post("/infer/semisam_stage_one", params={"image": "hippocampus_003", "output": "json"}).json()
        assert set(body["classes"]) == {"anterior", "posterior"}
        assert body["classes"]["anterior"]["volume_mm3"] > 0
        assert 0 < body["mean_confidence"] <= 1


def test_infer_without_template_is_409(tiny_studies, monkeypatch):
    (tiny_studies / "labels" / "final" / "hippocampus_001.nii.gz").unlink()
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        res = client.post("/infer/semisam_stage_one", params={"image": "hippocampus_003", "output": "json"})
        assert res.status_code == 409
        assert "needs a template" in res.json()["detail"]


def test_bad_template_label_is_422_naming_the_file_and_left_untouched(tiny_studies, monkeypatch):
    final = tiny_studies / "labels" / "final" / "hippocampus_001.nii.gz"
    img = nib.load(str(final))
    data = np.asarray(img.dataobj).copy()
    data[data == 2] = 5  # a value outside --conf labels
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(final))
    before = final.read_bytes()
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        res = client.post("/infer/semisam_stage_one", params={"image": "hippocampus_003", "output": "json"})
        assert res.status_code == 422
        detail = res.json()["detail"]  # the template's file by name, never where the server keeps it
        assert final.name in detail and str(final.parent) not in detail and "[5]" in detail
    assert final.read_bytes() == before


def test_label_tag_final_is_refused_for_model_output(tiny_studies, monkeypatch):
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        res = client.post("/infer/semisam_stage_one", params={"image": "hippocampus_003", "output": "json"}, data={"params": json.dumps({"label_tag": "final"})})
        assert res.status_code == 409


def test_pipeline_stage_one_writes_pseudo_labels_not_final(tiny_studies):
    report = run_stage_one(tiny_studies, AppConfig.from_conf(FAST), progress=False)
    assert report["images"] == 2
    datastore = open_datastore(tiny_studies)
    tagged = lambda tag: sorted(i for i in datastore.list_images() if datastore.get_label_by_image_id(i, tag))
    assert tagged("pseudo") == ["hippocampus_003", "hippocampus_008"]
    assert tagged("final") == ["hippocampus_001"]
    label_id = datastore.get_label_by_image_id("hippocampus_003", "pseudo")
    saved = nib.load(datastore.get_label_uri(label_id, "pseudo"))
    np.testing.assert_array_equal(saved.affine, load_image(tiny_studies / "hippocampus_003.nii.gz").affine)


def test_paper_prototype_ablation_labels_every_class_without_registration(tiny_studies, sample_source):
    """``--set stage_one.propagation=prototype``: one masked-mean prototype per class, cosine arg-max (the
    paper's stage one) -- above chance on real volumes, no registration file written, and below the
    default registration-guided fusion on the same case."""
    templates = find_templates(open_datastore(tiny_studies))
    case = tiny_studies / "hippocampus_003.nii.gz"
    truth = np.asarray(nib.load(str(sample_source.labels / "hippocampus_003.nii.gz")).dataobj)
    proto = build_stage_one(tiny_studies, AppConfig.from_conf({**FAST, "stage_one.propagation": "prototype"})).predict(case, templates)
    assert not (tiny_studies / ".semisam" / "registration").exists()
    assert set(np.unique(proto.label)) == {0, 1, 2} and proto.confidence.shape == truth.shape
    proto_dice = [dice(proto.label, truth, v) for v in (1, 2)]
    assert min(proto_dice) > 0.05, proto_dice  # chance is < 0.05
    fusion = build_stage_one(tiny_studies, AppConfig.from_conf(FAST)).predict(case, templates)
    assert np.mean([dice(fusion.label, truth, v) for v in (1, 2)]) > np.mean(proto_dice)
