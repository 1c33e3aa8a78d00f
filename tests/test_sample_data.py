import json
import shutil

import pytest
from conftest import make_datastore
from semisam_o1.sample_data import SampleDataError, SourceDir, load_manifest, populate, verify


def test_populate_lays_out_one_template_and_unlabelled_pool(datastore):
    manifest = load_manifest(datastore / "manifest.json")
    assert manifest == load_manifest()  # a new folder got the project's manifest
    images = sorted(p.name for p in datastore.glob("*.nii.gz"))
    assert len(images) == len(manifest["cases"]) == 20
    assert [p.name for p in (datastore / "labels" / "final").iterdir()] == [f"{manifest['template']}.nii.gz"]
    truth = sorted(p.name for p in (datastore / "truth").iterdir())
    assert len(truth) == 19 and f"{manifest['template']}.nii.gz" not in truth
    assert verify(datastore) == []


def test_populate_is_idempotent(datastore, sample_source):
    before = {p: p.stat().st_mtime_ns for p in datastore.rglob("*.nii.gz")}
    result = populate(datastore, source=sample_source, progress=False)
    assert result["copied"] == 0 and result["kept"] == 40
    assert {p: p.stat().st_mtime_ns for p in datastore.rglob("*.nii.gz")} == before


def test_corrupt_datastore_file_is_named_and_repaired(datastore, sample_source):
    victim = datastore / "hippocampus_003.nii.gz"
    victim.write_bytes(b"not a nifti")
    (datastore / "truth" / "hippocampus_008.nii.gz").unlink()
    problems = verify(datastore)
    assert len(problems) == 2
    assert any(str(victim) in p and "sha256" in p for p in problems)
    assert any("hippocampus_008.nii.gz: missing" in p for p in problems)
    assert populate(datastore, source=sample_source, progress=False)["copied"] == 2
    assert verify(datastore) == []


def test_corrupt_source_file_is_reported_by_name(tmp_path, sample_source):
    source = SourceDir(tmp_path / "src" / "images", tmp_path / "src" / "labels")
    shutil.copytree(sample_source.images, source.images)
    shutil.copytree(sample_source.labels, source.labels)
    bad = source.labels / "hippocampus_017.nii.gz"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(SampleDataError, match=str(bad)):
        make_datastore(tmp_path / "studies", source)


def test_manifest_carries_licence_and_attribution():
    from semisam_o1.sample_data import MANIFEST

    manifest = json.loads(MANIFEST.read_text())
    assert manifest["licence"].startswith("CC-BY-SA 4.0")
    assert "Decathlon" in manifest["attribution"]
    assert all(len(c["image_sha256"]) == 64 and len(c["label_sha256"]) == 64 for c in manifest["cases"])


def test_failed_download_is_one_line_naming_the_url_and_how_to_provide_the_data(tmp_path, monkeypatch, capsys):
    """No local copy and no network: ``main.py sample-data`` (hence ``make run``) ends in one clear line."""
    import tempfile

    from semisam_o1 import cli, sample_data
    from semisam_o1.distributed import free_port

    url = f"http://127.0.0.1:{free_port()}/Task04_Hippocampus.tar"  # nothing listens there
    monkeypatch.setenv("SEMISAM_SAMPLE_URL", url)
    monkeypatch.setattr(sample_data, "find_local_source", lambda *args: None)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    assert cli.main(["sample-data", "--studies", str(tmp_path / "studies")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: the sample data could not be downloaded from {url} (")
    assert "shared/data/hippocampus" in err and str(tmp_path / "tmp" / "semisam_o1_msd" / "Task04_Hippocampus.tar") in err
