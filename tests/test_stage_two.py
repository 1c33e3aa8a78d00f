"""Stage two on a tiny real datastore: rounds through MONAI Label's train endpoint, resume, network infer."""

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from semisam_o1.config import AppConfig
from semisam_o1.pool import build_stage_one, open_datastore
from semisam_o1.server.launch import APP_DIR
from semisam_o1.stage_one.normalize import normalize
from semisam_o1.stage_two.labels import ensemble_weights, resolve_ensemble, volume_change
from semisam_o1.stage_two.network import build_network, load_network, predict_with_uncertainty, save_network
from semisam_o1.stage_two.params import AUTO_VOLUME_CHANGE, StageTwoParams, TrainParams
from semisam_o1.stage_two.rounds import StageTwo
from semisam_o1.templates import find_templates
from semisam_o1.volumes import load_image

#: Fast settings: one orientation at 32 px, few iterations, small patches.
FAST = {
    "labels": "anterior=1,posterior=2",
    "stage_one.encoder_image_size": "32",
    "stage_one.registration": "demons",
    "stage_one.encoder_axes": "0",
    "stage_one.feature_dims": "8",
    "iterations": "4",
    "train.patch": "16",
    "rounds": "1",
}


def make_client(studies, monkeypatch, conf):
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    monkeypatch.setattr(settings, "MONAI_LABEL_APP_DIR", str(APP_DIR))
    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", str(studies))
    monkeypatch.setattr(settings, "MONAI_LABEL_APP_CONF", conf)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)
    import monailabel.app

    clear_cache()
    return TestClient(monailabel.app.app)


def test_round_through_train_endpoint_writes_pseudo_labels_and_serves_the_network(tiny_studies, monkeypatch):
    final_before = (tiny_studies / "labels" / "final" / "hippocampus_001.nii.gz").read_bytes()
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        before = client.post("/infer/semisam_o1", params={"image": "hippocampus_003", "output": "json"})
        assert before.status_code == 409 and "run training first" in before.json()["detail"]

        res = client.post("/train/semisam_o1", params={"run_sync": True}, json={})
        assert res.status_code == 200, res.text
        assert [r["round"] for r in res.json()["rounds"]] == [1]

        stats = client.get("/info/").json()["train_stats"]["semisam_o1"]
        assert stats["rounds_done"] == 1

        res = client.post("/infer/semisam_o1", params={"image": "hippocampus_008", "output": "json"}, data={"params": json.dumps({"uncertainty": True})})
        assert res.status_code == 200, res.text
        body = res.json()
        assert set(body["classes"]) == {"anterior", "posterior"}
        assert 0.0 <= body["uncertainty"]["uncertain_fraction"] <= 1.0
    datastore = open_datastore(tiny_studies)
    for image_id in ["hippocampus_003", "hippocampus_008"]:
        label_path = datastore.get_label_uri(datastore.get_label_by_image_id(image_id, "pseudo"), "pseudo")
        label = nib.load(label_path)
        assert label.shape == nib.load(str(tiny_studies / f"{image_id}.nii.gz")).shape
        np.testing.assert_array_equal(label.affine, nib.load(str(tiny_studies / f"{image_id}.nii.gz")).affine)
    assert datastore.get_labeled_images("final") == ["hippocampus_001"]
    assert (tiny_studies / "labels" / "final" / "hippocampus_001.nii.gz").read_bytes() == final_before


def test_train_without_template_is_refused_with_409(tiny_studies, monkeypatch):
    (tiny_studies / "labels" / "final" / "hippocampus_001.nii.gz").unlink()
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        res = client.post("/train/semisam_o1", json={})
        assert res.status_code == 409
        assert "needs a template" in res.json()["detail"]


def test_interrupted_round_is_redone_and_finished_rounds_are_kept(tiny_studies):
    config = AppConfig.from_conf({**FAST, "rounds": "2"})
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    templates = find_templates(datastore)
    pool = {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]}

    one = StageTwo(tiny_studies, stage_one, AppConfig.from_conf(FAST).stage_two_params())
    one.run(templates, pool)
    round1 = {p: p.read_bytes() for p in (one.work / "round_1").rglob("*") if p.is_file()}
    # a crash in round 2: partial files written, state not committed
    (one.work / "round_2" / "labels").mkdir(parents=True)
    (one.work / "round_2" / "model.pt").write_bytes(b"half a checkpoint")

    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    state = two.run(templates, pool)
    assert [r["round"] for r in state["rounds"]] == [1, 2]
    assert {p: p.read_bytes() for p in (one.work / "round_1").rglob("*") if p.is_file()} == round1
    assert two.load_model() is not None
    assert len(list((two.work / "round_2" / "labels").glob("*.nii.gz"))) == 2


def test_a_changed_pool_starts_again_instead_of_resuming(tiny_studies):
    config = AppConfig.from_conf(FAST)
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    templates = find_templates(datastore)
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    two.run(templates, {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]})
    first_model = two.model_version()

    # hippocampus_008 left the pool (e.g. a clinician labelled it): the finished round is not reused
    state = two.run(templates, {"hippocampus_003": datastore.get_image_uri("hippocampus_003")})
    assert [r["round"] for r in state["rounds"]] == [1]
    assert state["inputs"]["pool"] == ["hippocampus_003"]
    assert [p.name for p in two.labels_dir(1).glob("*.nii.gz")] == ["hippocampus_003.nii.gz"]
    assert two.model_version() != first_model


def test_stage_one_set_differently_starts_again_instead_of_resuming_on_its_old_labels(tiny_studies):
    config = AppConfig.from_conf(FAST)
    datastore = open_datastore(tiny_studies)
    templates = find_templates(datastore)
    pool = {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]}
    two = StageTwo(tiny_studies, build_stage_one(tiny_studies, config), config.stage_two_params())
    two.run(templates, pool)
    first_model = two.model_version()
    assert two.run(templates, pool)["inputs"]["stage_one"]["params"]["decision"] == "argmax"
    assert two.model_version() == first_model  # the same settings resume (nothing to do)

    # the server restarted with another fusion decision: round 0 is stage one's labels, so they are drawn again
    (two.work / "stage1" / "left-by-the-old-run").write_text("")
    volume = StageTwo(tiny_studies, build_stage_one(tiny_studies, AppConfig.from_conf({**FAST, "propagation.decision": "volume"})),
                      config.stage_two_params())
    state = volume.run(templates, pool)
    assert [r["round"] for r in state["rounds"]] == [1]
    assert state["inputs"]["stage_one"]["params"]["decision"] == "volume"
    assert state["inputs"]["stage_one"]["features"] == volume.stage_one.cache.settings_id
    assert not (volume.work / "stage1" / "left-by-the-old-run").exists()  # stage one's old labels were not reused
    assert len(list((volume.work / "stage1" / "labels").glob("*.nii.gz"))) == 2


def test_soft_pseudo_labels_are_the_mean_of_stage_one_and_every_round(tiny_studies):
    config = AppConfig.from_conf({**FAST, "rounds": "2", "stage_two.ensemble": "mean", "stage_two.teacher_floor": "false", "stage_two.refinement": "voxel", "stage_two.boundary": "none"})
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    templates = find_templates(datastore)
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    state = two.run(templates, {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]})

    image = load_image(datastore.get_image_uri("hippocampus_003"))
    soft = [np.load(two.probs_path(r, "hippocampus_003")).astype(np.float32) for r in range(3)]
    np.testing.assert_allclose(soft[0].sum(0), 1.0, atol=2e-3)
    np.testing.assert_array_equal(soft[0].argmax(0), stage_one.predict(image.path, templates).label)
    networks = [
        predict_with_uncertainty(load_network(two.work / f"round_{r}" / "model.pt"), normalize(image.array), config.stage_two_params().train.patch, mc_samples=2)[0]
        for r in (1, 2)
    ]
    np.testing.assert_allclose(soft[1], (soft[0] + networks[0]) / 2, atol=2e-3)
    np.testing.assert_allclose(soft[2], (soft[0] + networks[0] + networks[1]) / 3, atol=3e-3)
    # the hard labels are the soft labels' argmax, except the voxels the (paper's) refinement relabelled
    hard = nib.load(str(two.labels_dir(2) / "hippocampus_003.nii.gz")).get_fdata().astype(np.int64)
    assert 0 < state["rounds"][1]["uncertain_voxels"]
    assert (hard != soft[2].argmax(0)).sum() <= state["rounds"][1]["uncertain_voxels"]


def test_checkpoints_carry_their_architecture(tmp_path):
    """A server keeps serving a model trained with other channels; a checkpoint that does not say its architecture is refused."""
    small = TrainParams(channels=(4, 8), dropout=0.2)
    save_network(build_network(3, small), 3, tmp_path / "small.pt", small)
    assert [m.out_channels for m in load_network(tmp_path / "small.pt").modules() if isinstance(m, torch.nn.Conv3d)][0] == 4

    old = build_network(3, TrainParams(channels=(16, 32, 64, 128)))
    torch.save({"n_classes": 3, "state_dict": old.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(KeyError, match="channels"):
        load_network(tmp_path / "old.pt")


def test_uncertainty_map_is_kept_in_the_datastore_not_answered_as_a_server_path(tiny_studies, monkeypatch, tmp_path):
    import tempfile

    from monailabel.interfaces.utils.app import app_instance

    scratch = tmp_path / "scratch"  # the server's temporary folder for this test
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with make_client(tiny_studies, monkeypatch, FAST) as client:
        small = TrainParams(channels=(4, 8))  # any published network will do: the answer's form is under test
        save_network(build_network(3, small), 3, app_instance().stage_two.model_path, small)
        res = client.post("/infer/semisam_o1", params={"image": "hippocampus_003", "output": "json"}, data={"params": json.dumps({"uncertainty": True})})
        assert res.status_code == 200, res.text

        def strings(value):
            if isinstance(value, dict):
                return [s for v in value.values() for s in strings(v)]
            return [s for v in value for s in strings(v)] if isinstance(value, list) else [value] if isinstance(value, str) else []

        assert not [s for s in strings(res.json()) if s.startswith("/") or str(tmp_path) in s]
        assert res.json()["uncertainty"]["map"] == {"label": "hippocampus_003", "tag": "uncertainty"}
        assert list(scratch.iterdir()) == []  # result and map files gone once answered

        kept = client.get("/datastore/label", params={"label": "hippocampus_003", "tag": "uncertainty"})
        assert kept.status_code == 200
    (tmp_path / "map.nii.gz").write_bytes(kept.content)
    entropy, image = nib.load(str(tmp_path / "map.nii.gz")), nib.load(str(tiny_studies / "hippocampus_003.nii.gz"))
    assert entropy.get_data_dtype() == np.float32 and entropy.shape == image.shape
    np.testing.assert_array_equal(entropy.affine, image.affine)
    assert entropy.get_fdata().min() >= 0


def test_prediction_leaves_the_global_rng_and_the_shared_model_alone():
    """Requests share one model: a prediction must not reseed torch's RNG nor flip the model's dropout."""
    small = TrainParams(channels=(4, 8), dropout=0.3)
    image = np.random.default_rng(0).random((20, 18, 16)).astype(np.float32)
    for mode in ("eval", "train"):
        net = build_network(3, small).train(mode == "train")
        modes = [m.training for m in net.modules()]
        torch.manual_seed(1234)
        rng = torch.get_rng_state()
        mc = [predict_with_uncertainty(net, image, (16, 16, 16), mc_samples=2)[0] for _ in range(2)]
        deterministic = predict_with_uncertainty(net, image, (16, 16, 16), mc_samples=0)[0]
        assert torch.equal(torch.get_rng_state(), rng), mode
        assert [m.training for m in net.modules()] == modes, mode
        np.testing.assert_array_equal(mc[0], mc[1])  # MC dropout stays reproducible
        assert not np.allclose(mc[0], deterministic)  # ... and really drops out


def test_training_patches_come_from_memory_maps_aligned_and_mostly_on_foreground(tmp_path):
    from semisam_o1.stage_two.patches import PatchSampler

    shape = (60, 50, 40)
    label = np.zeros(shape, np.uint8)
    label[40:46, 10:16, 30:36] = 1  # one small structure far from the centre
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    image[label > 0] = 2.0  # a marker: foreground voxels are recognisable in an image patch
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "label.npy", label)
    small = np.zeros((10, 50, 40), np.uint8)
    small[5, 20, 20] = 1
    sampler = PatchSampler([np.load(tmp_path / "image.npy", mmap_mode="r"), np.zeros(small.shape, np.float32)],
                           [np.load(tmp_path / "label.npy", mmap_mode="r"), small], (16, 16, 16), seed=0)
    patches = [sampler[0] for _ in range(300)]
    assert all(p["image"].shape == (1, 16, 16, 16) and p["label"].shape == (1, 16, 16, 16) for p in patches)
    assert all(np.array_equal(p["image"] == 2.0, p["label"] == 1) for p in patches)  # image and label crops line up
    on_structure = np.mean([p["label"].any() for p in patches])
    assert 0.55 < on_structure < 0.8  # pos 2 : neg 1, the structure is 0.4 % of the volume
    padded = sampler[1]  # 10 voxels deep: zero-padded evenly to the patch
    assert padded["label"].shape == (1, 16, 16, 16) and padded["label"].sum() == 1
    assert padded["label"][0, :3].sum() == 0 and padded["label"][0, 13:].sum() == 0
    # with context (augment="affine" rotates about it): the same patch, with its surroundings around it
    wide = PatchSampler([np.load(tmp_path / "image.npy", mmap_mode="r"), np.zeros(small.shape, np.float32)],
                        [np.load(tmp_path / "label.npy", mmap_mode="r"), small], (16, 16, 16), seed=0, context=(8, 8, 8))
    plain = PatchSampler([np.load(tmp_path / "image.npy", mmap_mode="r"), np.zeros(small.shape, np.float32)],
                         [np.load(tmp_path / "label.npy", mmap_mode="r"), small], (16, 16, 16), seed=0)
    for i in [0] * 50 + [1] * 5:
        a, b = wide[i], plain[i]
        assert a["label"].shape == (1, 32, 32, 32)
        np.testing.assert_array_equal(a["label"][:, 8:24, 8:24, 8:24], b["label"])
        np.testing.assert_array_equal(a["image"][:, 8:24, 8:24, 8:24], b["image"])


def test_a_round_replaces_the_previous_labels_only_where_it_is_confident(tiny_studies):
    """``--set stage_two.replace_confidence=0.6`` (refinement off, so nothing else relabels): a voxel takes the
    round's arg-max only where the soft label's top class holds >= 0.6, elsewhere it keeps round 0's label."""
    config = AppConfig.from_conf({**FAST, "stage_two.replace_confidence": "0.6", "stage_two.refinement": "none", "stage_two.teacher_floor": "false"})
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    state = two.run(find_templates(datastore), {"hippocampus_003": datastore.get_image_uri("hippocampus_003")})

    read = lambda r: nib.load(str(two.labels_dir(r) / "hippocampus_003.nii.gz")).get_fdata().astype(np.uint8)  # noqa: E731
    previous, label = read(0), read(1)
    soft = np.load(two.probs_path(1, "hippocampus_003")).astype(np.float32)  # (stored as float16)
    confident = soft.max(0) >= 0.6
    borderline = np.abs(soft.max(0) - 0.6) < 1e-3
    expected = np.where(confident, soft.argmax(0), previous)
    assert ((label != expected) & ~borderline).sum() == 0
    kept = state["rounds"][0]["kept_previous_fraction"]
    assert 0 < kept < 1 and abs(kept - (~confident).mean()) < 0.01
    # and where the round was not confident and disagreed, the previous label really was kept
    assert ((soft.argmax(0) != previous) & ~confident & ~borderline).any()


@pytest.mark.parametrize("moved, threshold", [(0.02, 0.6), (0.3, 0.0)])
def test_auto_replace_confidence_holds_labels_back_only_when_round_1_kept_the_class_volumes(tiny_studies, monkeypatch, moved, threshold):
    """``replace_confidence auto`` (the default): when round 1's network changed its training labels' class volumes
    on the pool by at most 10 % (``network_volume_change``, here set to ``moved``), every round's label replaces the
    previous round's only where the soft label's top class holds >= 0.6; when it moved them more (a network
    correcting stage one's volumes), everywhere. Round 1 decides from its own pool-wide change, later rounds
    from round 1's; each round's stats say which threshold it used."""
    from semisam_o1.parsers import ConfError
    from semisam_o1.stage_two import relabel, rounds

    real_change = rounds.volume_change
    for module in (rounds, relabel):  # the round's recorded change (rounds) and round 1's own threshold (relabel)
        monkeypatch.setattr(module, "volume_change", lambda network, labels: moved if real_change(network, labels) is not None else None)
    config = AppConfig.from_conf({**FAST, "rounds": "2", "stage_two.publish": "last", "stage_two.refinement": "none", "stage_two.teacher_floor": "false"})
    assert config.stage_two_params().replace_confidence is None  # auto is the default
    datastore = open_datastore(tiny_studies)
    two = StageTwo(tiny_studies, build_stage_one(tiny_studies, config), config.stage_two_params(), work=tiny_studies / ".semisam" / f"t{threshold}")
    state = two.run(find_templates(datastore), {"hippocampus_003": datastore.get_image_uri("hippocampus_003")})

    assert [r["replace_confidence"] for r in state["rounds"]] == [threshold, threshold]

    def read(round_):
        return nib.load(str(two.labels_dir(round_) / "hippocampus_003.nii.gz")).get_fdata().astype(np.uint8)

    for round_ in (1, 2):
        previous, label = read(round_ - 1), read(round_)
        soft = np.load(two.probs_path(round_, "hippocampus_003")).astype(np.float32)  # (stored as float16)
        confident = soft.max(0) >= threshold
        top2 = np.sort(soft, axis=0)[-2:]
        borderline = (np.abs(top2[1] - threshold) < 1e-3) | (top2[1] - top2[0] < 1e-3)  # float16 rounding, ties
        assert ((label != np.where(confident, soft.argmax(0), previous)) & ~borderline).sum() == 0
        assert abs(state["rounds"][round_ - 1]["kept_previous_fraction"] - (~confident).mean()) < 0.01
    assert (state["rounds"][0]["kept_previous_fraction"] > 0) == (threshold > 0)
    assert not list(two.work.glob("round_*/predicted*"))  # the candidate not taken is gone too
    assert AppConfig.from_conf({"stage_two.replace_confidence": "0.7"}).stage_two_params().replace_confidence == 0.7
    with pytest.raises(ConfError, match="replace_confidence"):
        AppConfig.from_conf({"stage_two.replace_confidence": "1.5"})


def test_published_round_is_chosen_by_a_label_free_signal_and_rounds_stop_early(tiny_studies):
    from semisam_o1.choices import SIGNALS
    from semisam_o1.stage_two.labels import choose_round

    rounds = [{"round": 1, "network_entropy": 0.30}, {"round": 2, "network_entropy": 0.20}, {"round": 3, "network_entropy": 0.25}]
    assert choose_round(rounds, "network_entropy")["round"] == 2
    assert choose_round(rounds, "last")["round"] == 3
    assert choose_round([{"round": 1}, {"round": 2, "network_entropy": 0.9}], "network_entropy")["round"] == 2  # unrecorded = worst

    config = AppConfig.from_conf({**FAST, "rounds": "3", "stage_two.publish": "network_entropy"})
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    state = two.run(find_templates(datastore), {"hippocampus_003": datastore.get_image_uri("hippocampus_003")})
    done = state["rounds"]
    assert all(set(SIGNALS) <= set(r) for r in done)
    best = min(done, key=lambda r: (r["network_entropy"], r["round"]))["round"]
    assert state["published"]["round"] == best and state["published"]["by"] == "network_entropy"
    assert two.published_round() == two.work / f"round_{best}"  # the served network is that round's
    assert (two.work / f"round_{best}" / "model.pt").read_bytes() == two.model_path.read_bytes()
    # rounds go on only while each is the best so far
    assert bool(state.get("stopped_early")) == (len(done) < 3)
    assert all(choose_round(done[:r], "network_entropy")["round"] == r for r in range(1, len(done)))


def test_pseudo_templates_join_round_zero_but_are_never_final_labels(tiny_studies):
    """``pseudo_templates 1`` (the default): the pool image stage one trusts most becomes a template for the
    others' round-0 labels (never for itself), is listed in the state with how much it changed the pool's
    class volumes, and no ``final`` label is written."""
    from semisam_o1.stage_two.round_zero import stage_one_trust
    from semisam_o1.templates import Template
    from semisam_o1.volumes import label_array

    config = AppConfig.from_conf({**FAST, "stage_two.boundary": "none"})  # round 0 = stage one's labels as drawn (borders: their own test)
    assert config.stage_two_params().pseudo_templates == 1
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    templates = find_templates(datastore)
    finals_before = sorted(p.name for p in (tiny_studies / "labels" / "final").iterdir())
    pool = {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]}
    # (any volume change accepted here: the dropping is the next test's)
    two = StageTwo(tiny_studies, stage_one, replace(config.stage_two_params(), pseudo_templates_volume_change=1.0))
    state = two.run(templates, pool)

    trust = {i: stage_one_trust(stage_one.predict(p, templates)) for i, p in pool.items()}
    chosen = max(sorted(pool), key=lambda i: trust[i])  # ties: the first id
    other = next(i for i in pool if i != chosen)
    assert [p["image"] for p in state["pseudo_templates"]] == [chosen]
    assert state["pseudo_templates"][0]["trust"] == round(trust[chosen], 4)
    pseudo = Template(chosen, pool[chosen], two.work / "stage1" / "labels" / f"{chosen}.nii.gz")
    image = load_image(pool[other])
    round0 = nib.load(str(two.labels_dir(0) / f"{other}.nii.gz")).get_fdata().astype(np.uint8)
    np.testing.assert_array_equal(round0, stage_one.predict(image.path, [*templates, pseudo]).label)
    # the chosen image itself is labelled from the real templates only: the first pass's label and soft label, not a second stage one
    own = nib.load(str(two.labels_dir(0) / f"{chosen}.nii.gz")).get_fdata().astype(np.uint8)
    np.testing.assert_array_equal(own, stage_one.predict(pool[chosen], templates).label)
    for sub, name in (("labels", f"{chosen}.nii.gz"), ("probs", f"{chosen}.npy")):
        assert (two.work / "pseudo" / sub / name).read_bytes() == (two.work / "stage1" / sub / name).read_bytes()
    # the recorded volume change is the pool's, with against without the pseudo-template
    count = lambda where: {str(c): sum(int((label_array(two.work / where / "labels" / f"{i}.nii.gz") == c).sum()) for i in pool)  # noqa: E731
                           for c in (1, 2)}
    assert state["pseudo_templates_volume_change"] == volume_change(count("pseudo"), count("stage1")) > 0
    assert StageTwo.summary(state)["pseudo_templates_volume_change"] == state["pseudo_templates_volume_change"]
    assert sorted(p.name for p in (tiny_studies / "labels" / "final").iterdir()) == finals_before
    assert find_templates(open_datastore(tiny_studies)) == templates


def test_pseudo_templates_that_change_the_pools_class_volumes_are_dropped(tiny_studies):
    """Pseudo-templates that change the pool's stage-one class volumes by more than the limit (0.10 by default;
    here 0, so any change) are dropped: round 0 is stage one from the real templates alone, labels and soft
    labels, and the state says why."""
    config = AppConfig.from_conf({**FAST, "stage_two.boundary": "none"})
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    templates = find_templates(datastore)
    pool = {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]}
    two = StageTwo(tiny_studies, stage_one, replace(config.stage_two_params(), pseudo_templates_volume_change=0.0))
    state = two.run(templates, pool)

    assert state["pseudo_templates"] == [] and state["pseudo_templates_volume_change"] > 0
    assert "changed the pool's stage-one class volumes" in state["pseudo_templates_note"] and "real templates only" in state["pseudo_templates_note"]
    for i, path in pool.items():
        round0 = nib.load(str(two.labels_dir(0) / f"{i}.nii.gz")).get_fdata().astype(np.uint8)
        np.testing.assert_array_equal(round0, stage_one.predict(path, templates).label)
        np.testing.assert_array_equal(np.load(two.work / "round_0" / "probs" / f"{i}.npy"), np.load(two.work / "stage1" / "probs" / f"{i}.npy"))
    # the labels with the pseudo-template differ from round 0 (else the change would be 0)
    assert any((nib.load(str(two.work / "pseudo" / "labels" / f"{i}.nii.gz")).get_fdata() != nib.load(str(two.labels_dir(0) / f"{i}.nii.gz")).get_fdata()).any()
               for i in pool)


def test_a_clearly_wrong_pool_image_is_never_a_pseudo_template_and_without_any_the_real_templates_stand_alone(tiny_studies):
    """A pool image with no anatomy (hippocampus_003's voxels shuffled) maps onto unlike tissue: it is
    never chosen. A pool where no image qualifies runs from the real templates alone and says so."""
    from semisam_o1.stage_two.round_zero import choose_pseudo_templates

    image = nib.load(str(tiny_studies / "hippocampus_003.nii.gz"))
    shuffled = np.random.default_rng(0).permutation(image.get_fdata().ravel()).reshape(image.shape)
    nib.save(nib.Nifti1Image(shuffled.astype(np.float32), image.affine, image.header), str(tiny_studies / "hippocampus_900.nii.gz"))
    config = AppConfig.from_conf({**FAST, "stage_two.pseudo_templates": "2", "stage_two.boundary": "none"})
    params = replace(config.stage_two_params(), pseudo_templates_volume_change=1.0)  # (the choice only: no volume check)
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    templates = find_templates(datastore)
    pool = {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008", "hippocampus_900"]}

    two = StageTwo(tiny_studies, stage_one, params, work=tiny_studies / "two-a")
    state = two.run(templates, pool)
    records = {i: json.loads((two.work / "stage1" / "trust" / f"{i}.json").read_text()) for i in pool}
    assert records["hippocampus_900"]["consistency"] < records["hippocampus_008"]["consistency"] - 0.2
    chosen = [p["image"] for p in state["pseudo_templates"]]
    assert "hippocampus_900" not in chosen and chosen
    # (by the floor's agreement alone it would have been: it is among the 2 most trusted)
    assert "hippocampus_900" in sorted(pool, key=lambda i: -records[i]["trust"])[:2]
    assert chosen == choose_pseudo_templates(records, 2, stage_one.params.mapping_tolerance)[0]

    two = StageTwo(tiny_studies, stage_one, params, work=tiny_studies / "two-b")
    alone = {i: pool[i] for i in ["hippocampus_003", "hippocampus_900"]}
    records = {i: json.loads((tiny_studies / "two-a" / "stage1" / "trust" / f"{i}.json").read_text()) for i in alone}
    assert choose_pseudo_templates(records, 1, stage_one.params.mapping_tolerance)[0] == []  # (003 falls back: see below)
    state = two.run(templates, alone)
    assert state["pseudo_templates"] == [] and "real templates only" in state["pseudo_templates_note"]
    round0 = nib.load(str(two.labels_dir(0) / "hippocampus_003.nii.gz")).get_fdata().astype(np.uint8)
    np.testing.assert_array_equal(round0, stage_one.predict(alone["hippocampus_003"], templates).label)


def test_round_zero_moves_stage_ones_borders_to_the_images_edges_and_nothing_else(tiny_studies):
    """``boundary edges`` (the default): round 0 is stage one's label with its class borders moved at most
    one voxel, toward the image's edges; voxels deeper inside a class or farther outside never change.
    Its soft labels stay distributions whose argmax is the label, and the state records the fraction
    of foreground voxels that changed. A run resumed for more rounds keeps round 0 as it is, and its count."""
    from scipy import ndimage as ndi
    from semisam_o1.volumes import label_array

    config = AppConfig.from_conf({**FAST, "stage_two.pseudo_templates": "0"})
    assert config.stage_two_params().boundary == "edges"
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    pool = {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]}
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    state = two.run(find_templates(datastore), pool)

    changed = foreground = 0
    for i in pool:
        drawn = np.asarray(label_array(two.work / "stage1" / "labels" / f"{i}.nii.gz"))
        snapped = np.asarray(label_array(two.labels_dir(0) / f"{i}.nii.gz"))
        fixed = ~ndi.binary_dilation(drawn > 0)  # outside the dilated foreground ...
        for c in (1, 2):
            fixed |= ndi.binary_erosion(drawn == c)  # ... or inside an eroded class: never changed
        assert not (snapped != drawn)[fixed].any()
        changed, foreground = changed + int((snapped != drawn).sum()), foreground + int((drawn > 0).sum())
        soft = np.load(two.probs_path(0, i)).astype(np.float32)
        np.testing.assert_allclose(soft.sum(0), 1.0, atol=2e-3)
        assert (soft.argmax(0) == snapped).mean() > 0.999  # (float16 ties)
    assert changed > 0
    assert state["boundary_changed"] == round(changed / foreground, 4) == StageTwo.summary(state)["boundary_changed"]
    before = {p: p.stat().st_mtime_ns for p in (two.work / "round_0").rglob("*.*")}
    more = StageTwo(tiny_studies, stage_one, replace(config.stage_two_params(), rounds=2)).run(find_templates(datastore), pool)
    assert [r["round"] for r in more["rounds"]] == [1, 2] and more["boundary_changed"] == state["boundary_changed"]
    assert {p: p.stat().st_mtime_ns for p in (two.work / "round_0").rglob("*.*")} == before


def test_a_class_that_drifts_from_stage_one_returns_to_stage_ones_label(tiny_studies):
    """Teacher floor (default): a round's class that fails the safety floor's check against stage one's
    label of the same image (here: the posterior part shrunk to a sliver) is written as stage one's."""
    config = AppConfig.from_conf(FAST)
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    image_id = "hippocampus_008"
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    state = two.run(find_templates(datastore), {image_id: datastore.get_image_uri(image_id)})
    assert "returned_to_stage_one" in state["rounds"][0]

    grid = load_image(datastore.get_image_uri(image_id))
    teacher = np.asarray(two._label_array(0, image_id, grid))
    drifted = teacher.copy()
    drifted[drifted == 2] = 0
    drifted[tuple(np.argwhere(teacher == 2)[0])] = 2  # one voxel left of class 2
    drifted[(teacher == 1)] = 1  # class 1 unchanged
    two._returned.clear()
    two._save_refined(1, image_id, drifted, grid)
    written = nib.load(str(two.labels_dir(1) / f"{image_id}.nii.gz")).get_fdata().astype(np.uint8)
    np.testing.assert_array_equal(written == 2, teacher == 2)
    np.testing.assert_array_equal(written == 1, teacher == 1)
    assert two._returned == {"2": 1}

    off = StageTwo(tiny_studies, stage_one, AppConfig.from_conf({**FAST, "stage_two.teacher_floor": "false"}).stage_two_params(), work=two.work)
    off._save_refined(1, image_id, drifted, grid)
    written = nib.load(str(off.labels_dir(1) / f"{image_id}.nii.gz")).get_fdata().astype(np.uint8)
    assert int((written == 2).sum()) == 1


def test_the_network_trains_and_predicts_on_a_shrunk_grid_and_answers_on_the_images_own(tiny_studies):
    """Large scans: the network sees each image shrunk under ``network_voxels`` (more context per patch,
    fewer voxels to predict); pseudo-labels and served predictions stay on the image's own grid, and a
    checkpoint keeps predicting on the grid it was trained on whatever the server's options are now."""
    import dataclasses

    from semisam_o1.stage_one.plan import shrink_factors
    from semisam_o1.stage_two.network import probs_to_grid, shrunk_shape

    config = AppConfig.from_conf({**FAST, "stage_two.network_voxels": "20000", "stage_two.teacher_floor": "false"})
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    templates = find_templates(datastore)
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    two.run(templates, {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]})

    image = load_image(datastore.get_image_uri("hippocampus_003"))
    small = shrunk_shape(image.array.shape, shrink_factors(image.array.shape, image.spacing, 20000))
    assert np.prod(small) <= 20000 < np.prod(image.array.shape)
    assert np.load(two.image_array_path("hippocampus_003")).shape == small  # what training reads
    assert nib.load(str(two.labels_dir(1) / "hippocampus_003.nii.gz")).shape == image.array.shape
    net = two.load_model()
    assert net.grid_voxels == 20000
    # hippocampus head (anterior) and tail (posterior) mirror onto each other along the long axis (1): never flipped there
    assert net.flip_axes == (0, 2)
    from semisam_o1.stage_two.network import image_to_grid

    on_grid = predict_with_uncertainty(net, image_to_grid(normalize(image.array), small), config.stage_two_params().train.patch, mc_samples=2)[0]
    soft = [np.load(two.probs_path(r, "hippocampus_003")).astype(np.float32) for r in (0, 1)]
    np.testing.assert_allclose(soft[1], (soft[0] + probs_to_grid(on_grid, image.array.shape)) / 2, atol=2e-3)

    # a server whose options say "own grid" still serves this checkpoint on its training grid
    native = StageTwo(tiny_studies, stage_one, dataclasses.replace(config.stage_two_params(), network_voxels=None))
    label, entropy = native.predict(net, image)
    assert label.shape == entropy.shape == image.array.shape
    np.testing.assert_array_equal(label, two.predict(net, image)[0])
    expected = probs_to_grid(predict_with_uncertainty(net, image_to_grid(normalize(image.array), small), (16,) * 3, mc_samples=0)[0], image.array.shape)
    np.testing.assert_array_equal(label, expected.argmax(0))


def test_with_ensemble_network_a_rounds_soft_labels_are_its_network_alone(tiny_studies):
    config = AppConfig.from_conf({**FAST, "stage_two.ensemble": "network", "stage_two.teacher_floor": "false"})
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    two.run(find_templates(datastore), {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]})

    image = load_image(datastore.get_image_uri("hippocampus_003"))
    network = predict_with_uncertainty(two.load_model(), normalize(image.array), config.stage_two_params().train.patch, mc_samples=2)[0]
    soft = np.load(two.probs_path(1, "hippocampus_003")).astype(np.float32)
    np.testing.assert_allclose(soft, network, atol=2e-3)
    assert np.abs(soft - np.load(two.probs_path(0, "hippocampus_003")).astype(np.float32)).max() > 0.1  # stage one has no say


def test_ensemble_weights_unroll_to_their_documented_means():
    rng = np.random.default_rng(0)
    stage_one, nets = rng.random(5), rng.random((4, 5))
    for ensemble, expected in {
        "mean": lambda r: (stage_one + nets[:r].sum(0)) / (r + 1),
        "anchored": lambda r: stage_one / 2 + nets[:r].mean(0) / 2,
        "latest": lambda r: (stage_one + nets[r - 1]) / 2,
        "network": lambda r: nets[r - 1],
    }.items():
        soft = stage_one
        for r in range(1, 5):
            w_net, w_prev, w_stage1 = ensemble_weights(ensemble, r)
            soft = w_net * nets[r - 1] + w_prev * soft + w_stage1 * stage_one
            np.testing.assert_allclose(soft, expected(r), err_msg=f"{ensemble}, round {r}")
    with pytest.raises(ValueError, match="ensemble"):
        ensemble_weights("median", 1)


@pytest.mark.parametrize("ensemble, round_two", [
    ("anchored", lambda s0, net1, net2: s0 / 2 + (net1 + net2) / 4),  # stage one keeps half the say, the networks share the rest
    ("latest", lambda s0, net1, net2: (s0 + net2) / 2),  # the round's (warm-started) network stands for the earlier ones
])
def test_round_two_soft_labels_weigh_stage_one_and_the_networks_as_the_ensemble_says(tiny_studies, ensemble, round_two):
    config = AppConfig.from_conf({**FAST, "rounds": "2", "stage_two.ensemble": ensemble, "stage_two.teacher_floor": "false"})
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    rounds = two.run(find_templates(datastore), {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]})["rounds"]
    assert [r["ensemble"] for r in rounds] == [ensemble, ensemble]

    image = load_image(datastore.get_image_uri("hippocampus_003"))
    patch = config.stage_two_params().train.patch
    net1, net2 = (predict_with_uncertainty(load_network(two.work / f"round_{r}" / "model.pt"), normalize(image.array), patch, mc_samples=2)[0]
                  for r in (1, 2))
    soft = [np.load(two.probs_path(r, "hippocampus_003")).astype(np.float32) for r in (0, 1, 2)]
    np.testing.assert_allclose(soft[1], (soft[0] + net1) / 2, atol=2e-3)
    np.testing.assert_allclose(soft[2], round_two(soft[0], net1, net2), atol=3e-3)
    if ensemble == "latest":
        assert np.abs(soft[2] - (2 * soft[1] + net2) / 3).max() > 0.01  # not the mean ensemble


def test_volume_change_and_the_auto_ensemble_it_chooses():
    """``auto`` anchors stage one only after a round-1 network that grew or shrank its training labels'
    class volumes by more than 10 % (summed over classes, so one class growing while another shrinks
    counts both): against the round's own network with warm starts, the mean of fresh ones without;
    without round 1's measure it keeps the mean ensemble."""
    assert volume_change({"1": 115}, {"1": 100}) == 0.15  # LA's network: 1.15 x its labels
    assert volume_change({"1": 98, "2": 100}, {"1": 100, "2": 100}) == 0.01
    assert volume_change({"1": 120, "2": 80}, {"1": 100, "2": 100}) == 0.2  # the total is unchanged, the classes are not
    assert volume_change({"1": 5}, {"1": 0}) is None
    assert AUTO_VOLUME_CHANGE == 0.10
    for change, expected in {0.15: "latest", 0.10: "mean", 0.02: "mean", None: "mean"}.items():
        assert resolve_ensemble("auto", [{"network_volume_change": change}]) == expected, change
        assert resolve_ensemble("auto", [{"network_volume_change": change}], warm_start=False) == expected.replace("latest", "anchored")
    assert resolve_ensemble("auto", []) == "mean"
    assert resolve_ensemble("auto", [{}]) == "mean"  # a round recorded before the measure existed
    assert all(resolve_ensemble(e, [{"network_volume_change": 0.5}]) == e for e in ("mean", "anchored", "latest", "network"))


def test_auto_ensemble_records_the_networks_volume_change_and_weighs_round_two_by_it(tiny_studies):
    config = AppConfig.from_conf({**FAST, "rounds": "2", "stage_two.ensemble": "auto", "stage_two.teacher_floor": "false"})
    stage_one = build_stage_one(tiny_studies, config)
    datastore = open_datastore(tiny_studies)
    two = StageTwo(tiny_studies, stage_one, config.stage_two_params())
    ids = ["hippocampus_003", "hippocampus_008"]
    rounds = two.run(find_templates(datastore), {i: datastore.get_image_uri(i) for i in ids})["rounds"]

    patch = config.stage_two_params().train.patch
    nets = [load_network(two.work / f"round_{r}" / "model.pt") for r in (1, 2)]
    network, labels, soft = {"1": 0, "2": 0}, {"1": 0, "2": 0}, {}
    for i in ids:
        image = load_image(datastore.get_image_uri(i))
        pred = [predict_with_uncertainty(net, normalize(image.array), patch, mc_samples=2)[0] for net in nets]
        soft[i] = pred
        trained_on = np.load(two.labels_dir(0) / f"{i}.npy")
        for c in network:
            network[c] += int((pred[0].argmax(0) == int(c)).sum())
            labels[c] += int((trained_on == int(c)).sum())
    assert rounds[0]["ensemble"] == "mean"
    assert abs(rounds[0]["network_volume_change"] - volume_change(network, labels)) < 0.02
    assert rounds[0]["network_volume_ratio"].keys() == {"1", "2"}
    used = rounds[1]["ensemble"]
    assert used == resolve_ensemble("auto", rounds[:1])
    net1, net2 = soft["hippocampus_003"]
    s = [np.load(two.probs_path(r, "hippocampus_003")).astype(np.float32) for r in (0, 1, 2)]
    expected = (s[0] + net2) / 2 if used == "latest" else (s[0] + net1 + net2) / 3  # warm start: "latest", not "anchored"
    np.testing.assert_allclose(s[2], expected, atol=3e-3)


def test_affine_augmentation_moves_image_and_label_together_and_never_blends_label_values():
    """``--set train.augment=affine``: a patch read 1.5x larger is rotated and scaled about its centre and cut to the
    patch size; image and label move as one, labels keep their values, and half the patches are left as they are."""
    from semisam_o1.stage_two.patches import augmentation, sampled_patch

    params = TrainParams(patch=(16, 16, 16), augment="affine", flip_axes=())
    size = sampled_patch(params)
    assert size == (24, 24, 24)
    label = np.zeros(size, np.uint8)
    label[6:14, 8:18, 5:12], label[14:19, 8:18, 5:12] = 1, 2  # two touching classes, off-centre
    image = label.astype(np.float32) / 2  # image intensity marks the class
    transform = augmentation(params)
    centre = label[4:20, 4:20, 4:20]
    moved = 0
    for _ in range(40):
        out = transform({"image": image[None].copy(), "label": label[None].copy()})
        x, y = np.asarray(out["image"][0]), np.asarray(out["label"][0])
        assert x.shape == y.shape == (16, 16, 16)
        assert set(np.unique(y).tolist()) <= {0, 1, 2}  # nearest for labels: no class in between
        agree = np.mean(np.abs(x * 2 - y) < 0.5)  # the image's class at each voxel is the label's
        assert agree > 0.95
        moved += not np.array_equal(y, centre)
    assert 10 < moved < 35  # the affine is drawn with probability 0.5 (intensity jitter does not touch labels)


def test_on_thick_slices_affine_augmentation_turns_and_scales_in_plane_only(tmp_path):
    """A thick-slice grid (CHAOS T2: 7.7 mm slices, 2.5 mm in-plane on the network grid) is rotated about its slice
    axis and scaled in-plane: every output slice is one input slice, never a blend of two."""
    import dataclasses

    from semisam_o1.stage_two.patches import augmentation, sampled_patch

    params = TrainParams(patch=(16, 16, 16), augment="affine", flip_axes=(), slice_axis=0)
    size = sampled_patch(params)
    image = np.broadcast_to((np.arange(size[0]) % 2).astype(np.float32)[:, None, None], size).copy()  # slices 0, 1, 0, 1, ...
    transform = augmentation(params)
    for _ in range(20):
        x = np.asarray(transform({"image": image[None].copy(), "label": np.zeros((1, *size), np.uint8)})["image"][0])
        # intensity jitter maps 0 and 1 to two levels; a blend of neighbouring slices would make a third
        assert len(np.unique(np.round(x, 4))) == 2
        assert all(len(np.unique(np.round(s, 4))) == 1 for s in x)  # each output slice is one input slice
    # stage two finds the slice axis on the template's network grid
    affine = np.diag([1.25, 1.25, 7.7, 1.0])
    volume = np.random.default_rng(0).random((64, 64, 12), dtype=np.float32)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "thick.nii.gz")
    thick = load_image(tmp_path / "thick.nii.gz")
    labels = [np.zeros(thick.array.shape, np.uint8)]
    two = StageTwo.__new__(StageTwo)
    two.params = dataclasses.replace(AppConfig.from_conf({"train.augment": "affine"}).stage_two_params(), network_voxels=8000)
    train = two.train_params(labels, 2, thick)
    assert train.augment == "affine" and train.slice_axis == thick.spacing.index(max(thick.spacing))


def test_real_share_draws_that_share_of_training_patches_from_the_real_labels(tiny_studies, monkeypatch):
    """``real_share`` 0.5 (the default): half of every round's training patches come from the templates (and final
    labels), the rest from the pool's pseudo-labels; with 0 each image is drawn as often as any other."""
    from semisam_o1.parsers import ConfError
    from semisam_o1.stage_two import rounds as stage_two_module
    from semisam_o1.stage_two.labels import training_weights
    from semisam_o1.stage_two.loop import _prepare

    # the sampling itself: case 0 (the real label) is marked by its intensity
    cases = [np.full((20, 20, 20), 1.0 if i == 0 else 0.0, np.float32) for i in range(5)]
    labels = [np.zeros((20, 20, 20), np.uint8) for _ in range(5)]
    for lab in labels:
        lab[5:15, 5:15, 5:15] = 1
    params = TrainParams(patch=(8, 8, 8), batch_size=4, channels=(4, 8))
    for weights, low, high in ((training_weights(1, 4, 0.5), 0.42, 0.58), (None, 0.2, 0.2)):
        loader, _ = _prepare(cases, labels, 2, params, weights)
        drawn = [float(p.mean()) > 0.5 for _ in range(20) for batch in loader for p in batch["image"]]
        assert low <= np.mean(drawn) <= high, (weights, np.mean(drawn))

    # stage two hands the weights to the training: templates first, then the pool's pseudo-labels
    seen = []
    real_train = stage_two_module.train_network
    monkeypatch.setattr(stage_two_module, "train_network", lambda *a, **k: seen.append(k.get("weights")) or real_train(*a, **k))
    config = AppConfig.from_conf(FAST)
    datastore = open_datastore(tiny_studies)
    two = StageTwo(tiny_studies, build_stage_one(tiny_studies, config), config.stage_two_params())
    two.run(find_templates(datastore), {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]})
    assert seen == [[0.5, 0.25, 0.25]]
    assert AppConfig.from_conf({**FAST, "stage_two.real_share": "0"}).stage_two_params().real_share == 0.0
    with pytest.raises(ConfError, match="real_share"):
        AppConfig.from_conf({"stage_two.real_share": "1"})  # no patch left for the pool


def test_warm_start_trains_each_round_on_from_the_previous_rounds_network(tiny_studies, monkeypatch):
    """``warm_start`` (the default): round 1 trains a fresh network, every later round starts from the weights of
    the round before (as saved in its ``model.pt``) at ``warm_lr`` x round 1's peak learning rate; off, every
    round starts fresh at round 1's rate (the paper's design)."""
    from semisam_o1.parsers import ConfError
    from semisam_o1.stage_two import rounds as stage_two_module
    from semisam_o1.stage_two.training import train_network

    # train_network starts from ``init``: with a learning rate of 0 it returns exactly those weights
    cases = [np.random.default_rng(i).random((12, 12, 12), dtype=np.float32) for i in range(2)]
    labels = [(c > 0.5).astype(np.uint8) for c in cases]
    params = TrainParams(patch=(8, 8, 8), batch_size=2, channels=(4, 8), iterations=2, learning_rate=0.0)
    start = build_network(2, replace(params, seed=7)).state_dict()
    from_init, fresh = train_network(cases, labels, 2, params, init=start), train_network(cases, labels, 2, params)
    assert all(torch.equal(from_init.state_dict()[k], start[k]) for k in start)
    assert not all(torch.equal(fresh.state_dict()[k], start[k]) for k in start)

    seen = []
    real_train = stage_two_module.train_network
    rates = []
    monkeypatch.setattr(stage_two_module, "train_network",
                        lambda *a, **k: seen.append(k.get("init")) or rates.append(a[3].learning_rate) or real_train(*a, **k))
    datastore = open_datastore(tiny_studies)
    pool = {i: datastore.get_image_uri(i) for i in ["hippocampus_003", "hippocampus_008"]}
    base = TrainParams().learning_rate
    for warm, work in (("true", "warm"), ("false", "fresh")):
        seen.clear(), rates.clear()
        config = AppConfig.from_conf({**FAST, "rounds": "3", "stage_two.publish": "last", "stage_two.warm_start": warm, "stage_two.warm_lr": "3"})
        two = StageTwo(tiny_studies, build_stage_one(tiny_studies, config), config.stage_two_params(), work=tiny_studies / ".semisam" / work)
        two.run(find_templates(datastore), pool)
        assert len(seen) == 3 and seen[0] is None
        if warm == "false":
            assert seen[1:] == [None, None] and rates == [base] * 3  # warm_lr applies to warm starts only
            continue
        assert rates == pytest.approx([base, 3 * base, 3 * base])
        for round_, init in enumerate(seen[1:], 1):  # the weights round 1 / 2 saved
            saved = load_network(two.work / f"round_{round_}" / "model.pt").state_dict()
            assert init.keys() == saved.keys() and all(torch.equal(init[k], saved[k]) for k in saved)
    assert AppConfig.from_conf(FAST).stage_two_params().warm_start
    assert AppConfig.from_conf(FAST).stage_two_params().warm_lr == StageTwoParams().warm_lr == 2.0
    for bad in (("warm_start", "sometimes"), ("warm_lr", "0"), ("warm_lr", "20")):
        with pytest.raises(ConfError, match=bad[0]):
            AppConfig.from_conf(dict([bad]))
