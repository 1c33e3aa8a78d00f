"""3D Slicer's REST contract, replayed with MONAI Label's own client against the app as a real server process."""

import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import Server
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from test_server import QUIET
from test_stage_two import FAST

pytestmark = pytest.mark.server

#: What the Slicer module sends with every infer request.
SLICER_INFER = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False}
#: What it sends with a saved segmentation.
SLICER_LABEL_INFO = {"label_info": [{"name": "anterior", "idx": 1}, {"name": "posterior", "idx": 2}]}


def assert_same_grid(result_path: str, image_path) -> sitk.Image:
    result, image = sitk.ReadImage(result_path), sitk.ReadImage(str(image_path))
    assert result.GetSize() == image.GetSize()
    np.testing.assert_allclose(result.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(result.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(result.GetDirection(), image.GetDirection(), atol=1e-6)
    return result


def wait_training(client: MONAILabelClient, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.train_status()
        if status.get("status") not in {"SUBMITTED", "RUNNING"}:
            return status
        time.sleep(1)
    raise AssertionError(f"training still running after {timeout} s")


def test_slicer_session_infer_save_next_sample_train(tiny_studies, sample_source, tmp_path):
    conf = [arg for key, value in FAST.items() for arg in ("--conf", key, value)]
    with Server(tiny_studies, *conf, env=QUIET) as server:
        client = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="slicer-test")
        info = client.info()
        for model in ("semisam_stage_one", "semisam_o1"):
            assert info["models"][model]["type"] == "segmentation"
            assert info["models"][model]["labels"] == {"anterior": 1, "posterior": 2}

        image = tiny_studies / "hippocampus_003.nii.gz"
        result, body = client.infer("semisam_stage_one", "hippocampus_003", dict(SLICER_INFER))
        assert result.endswith(".nrrd")
        label = sitk.GetArrayFromImage(assert_same_grid(result, image))
        assert set(np.unique(label)) == {0, 1, 2} and label.dtype == np.uint8
        assert body["templates"] == ["hippocampus_001"]

        # the clinician corrects and saves: Slicer uploads NRRD with label_info; it becomes a template
        corrected = tmp_path / "hippocampus_003.nrrd"
        sitk.WriteImage(sitk.ReadImage(str(sample_source.labels / "hippocampus_003.nii.gz")), str(corrected))
        saved = client.save_label("hippocampus_003", str(corrected), tag="final", params=dict(SLICER_LABEL_INFO))
        assert saved["template"] == "hippocampus_003" and saved["templates"] == 2

        nxt = client.next_sample("uncertain", {})
        assert nxt["id"] == "hippocampus_008"  # the only image without a final label

        with pytest.raises(MONAILabelClientException, match="semisam_o1"):  # no network trained yet: 409
            client.infer("semisam_o1", "hippocampus_008", dict(SLICER_INFER))
        client.train_start("semisam_o1", {"rounds": 1})
        with pytest.raises(MONAILabelClientException, match="429"):  # no second concurrent run
            client.train_start("semisam_o1", {"rounds": 1})
        status = wait_training(client)
        assert status["status"] == "DONE", status
        assert any("stage2 round 1/1" in line for line in status["details"])

        result, body = client.infer("semisam_o1", "hippocampus_008", dict(SLICER_INFER))
        assert_same_grid(result, tiny_studies / "hippocampus_008.nii.gz")
        assert 0 <= body["uncertainty"]["uncertain_fraction"] <= 1
