"""The app as MONAI Label loads it: its own loader and its own FastAPI app, in this process."""

import pytest
from fastapi.testclient import TestClient
from semisam_o1.cli import sample_conf
from semisam_o1.server.launch import APP_DIR


@pytest.fixture()
def client(datastore, monkeypatch):
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    monkeypatch.setattr(settings, "MONAI_LABEL_APP_DIR", str(APP_DIR))
    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", str(datastore))
    monkeypatch.setattr(settings, "MONAI_LABEL_APP_CONF", sample_conf(datastore))
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)
    import monailabel.app

    clear_cache()
    with TestClient(monailabel.app.app) as c:
        yield c
    clear_cache()


def test_app_loads_through_monai_label_loader(datastore):
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    clear_cache()
    app = app_instance(app_dir=str(APP_DIR), studies=str(datastore), conf=sample_conf(datastore))
    assert type(app).__name__ == "SemiSAMO1App"
    assert app.info()["labels"] == {"anterior": 1, "posterior": 2}
    clear_cache()


def test_info_lists_template_label_names_and_tasks(client):
    info = client.get("/info/").json()
    assert info["name"] == "SemiSAM-O1"
    assert info["labels"] == {"anterior": 1, "posterior": 2}
    assert {"random", "first"} <= set(info["strategies"])
    assert "dice" in info["scoring"]
    # the settings in force, as --conf writes them; no research setting differs from its default
    assert info["semisam"]["options"]["rounds"] == "3" and info["semisam"]["options"]["labels"] == "anterior=1,posterior=2"
    assert info["semisam"]["research_settings"] == {}


def test_info_shows_research_settings_set_for_the_server(datastore):
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    clear_cache()
    app = app_instance(app_dir=str(APP_DIR), studies=str(datastore), conf={**sample_conf(datastore), "stage_two.warm_lr": "3"})
    assert app.info()["semisam"]["research_settings"] == {"stage_two.warm_lr": "3.0"}
    assert app.stage_two.params.warm_lr == 3.0
    clear_cache()


def test_datastore_stats_show_one_labelled_and_pool(client):
    stats = client.get("/datastore/", params={"output": "stats"}).json()
    assert stats["total"] == 20
    assert stats["completed"] == 1
    assert stats["label_tags"] == {"final": 1}


def test_label_without_names_gets_generic_name(datastore):
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    clear_cache()
    app = app_instance(app_dir=str(APP_DIR), studies=str(datastore), conf={})
    assert app.info()["labels"] == {"label_1": 1, "label_2": 2}
    clear_cache()


def test_nrrd_final_label_is_a_template_everywhere(tiny_studies, monkeypatch):
    """A ``final`` label dropped into the datastore as NRRD (3D Slicer's format) names the labels and serves as template."""
    import SimpleITK as sitk
    from test_stage_two import FAST, make_client

    final = tiny_studies / "labels" / "final" / "hippocampus_001.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(final)), str(final.with_name("hippocampus_001.nrrd")))
    final.unlink()
    with make_client(tiny_studies, monkeypatch, {k: v for k, v in FAST.items() if k != "labels"}) as client:
        info = client.get("/info/")
        assert info.status_code == 200, info.text
        assert info.json()["labels"] == {"label_1": 1, "label_2": 2}  # read from the NRRD template itself
        assert info.json()["semisam"]["templates"] == ["hippocampus_001"]
        res = client.post("/infer/semisam_stage_one", params={"image": "hippocampus_003", "output": "json"})
        assert res.status_code == 200, res.text
        assert res.json()["templates"] == ["hippocampus_001"] and res.json()["classes"]["label_2"]["voxels"] > 0
