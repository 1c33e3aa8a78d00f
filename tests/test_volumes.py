"""Bad input is refused with the file's name; labels keep the image's exact geometry."""

from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from semisam_o1.volumes import (InputError, dhw_to_sitk, load_array, load_arrays, load_image, load_label, save_label,
                                sitk_to_dhw)

QUIRKS = "hippocampus-quirks"


@pytest.fixture()
def image(sample_source):
    return load_image(sample_source.images / "hippocampus_003.nii.gz")


def write(path, array, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def test_label_of_another_shape_is_refused(image, sample_source):
    quirk = sample_source.images.parent.parent / QUIRKS / "label_not_hippocampus_512x512x94.nii.gz"
    if not quirk.exists():
        pytest.skip(f"{quirk} not present")
    with pytest.raises(InputError, match=f"{quirk}: label shape .* does not match image hippocampus_003"):
        load_label(quirk, image)


def test_label_with_other_affine_is_refused(image, tmp_path):
    affine = image.affine.copy()
    affine[0, 3] += 5.0
    bad = write(tmp_path / "shifted.nii.gz", np.ones(image.array.shape, np.uint8), affine)
    with pytest.raises(InputError, match=f"{bad}: label geometry"):
        load_label(bad, image)


def test_label_values_outside_the_map_and_empty_labels_are_refused(image, tmp_path):
    label = np.zeros(image.array.shape, np.uint8)
    label[10:12, 10:12, 10:12] = 3
    bad = write(tmp_path / "three.nii.gz", label, image.affine)
    with pytest.raises(InputError, match=r"label values \[3\] are not in the label map \[1, 2\]"):
        load_label(bad, image, allowed={1, 2})
    empty = write(tmp_path / "empty.nii.gz", np.zeros(image.array.shape, np.uint8), image.affine)
    with pytest.raises(InputError, match=f"{empty}: label is empty"):
        load_label(empty, image)


@pytest.mark.parametrize("kind", ["nan", "constant", "truncated", "2d"])
def test_bad_images_are_refused_with_their_name(tmp_path, kind, sample_source):
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "nan":
        array = np.ones((8, 8, 8), np.float32)
        array[1, 2, 3] = np.nan
        write(path, array)
    elif kind == "constant":
        write(path, np.full((8, 8, 8), 7, np.float32))
    elif kind == "truncated":
        path.write_bytes((sample_source.images / "hippocampus_003.nii.gz").read_bytes()[:5000])
    else:
        write(path, np.ones((8, 8), np.float32))
    with pytest.raises(InputError, match=str(path)):
        load_image(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_saved_label_has_the_image_geometry(image, tmp_path, suffix):
    label = (image.array > np.median(image.array)).astype(np.uint8)
    out = save_label(label, image, tmp_path / f"label{suffix}")
    ref, got = sitk.ReadImage(str(image.path)), sitk.ReadImage(str(out))
    assert got.GetSize() == ref.GetSize()
    assert got.GetOrigin() == ref.GetOrigin()
    assert got.GetSpacing() == ref.GetSpacing()
    assert got.GetDirection() == ref.GetDirection()
    assert got.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got).transpose(2, 1, 0), label)
    if suffix == ".nii.gz":
        np.testing.assert_array_equal(nib.load(str(out)).affine, image.affine)


def test_evaluate_folders_scores_each_matching_case_and_lists_the_missing(tmp_path):
    from semisam_o1.evaluation import evaluate_folders

    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[2:6, 2:6, 2:6] = 1  # 64 voxels
    truth[0, 0, 0] = 2
    pred = truth.copy()
    pred[2:4, 2:6, 2:6] = 0  # half of class 1 missed: Dice 2*32/(64+32) = 2/3
    for name, t, p in [("a", truth, pred), ("b", truth, truth)]:
        nib.save(nib.Nifti1Image(t, affine), truth_dir / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(p, affine), pred_dir / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(truth, affine), truth_dir / "c.nii.gz")  # no prediction
    result = evaluate_folders(pred_dir, truth_dir, {"one": 1, "two": 2})
    assert sorted(result["cases"]) == ["a", "b"] and result["missing"] == ["c.nii.gz"]
    assert result["cases"]["a"]["one"]["dice"] == pytest.approx(2 / 3)
    assert result["cases"]["b"]["one"]["dice"] == 1.0 and result["cases"]["b"]["one"]["hd95"] == 0.0
    assert result["mean"]["one"]["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert result["cases"]["a"]["one"]["hd95"] == pytest.approx(4.0)  # 2 voxels along the 2 mm axis
    with pytest.raises(InputError, match="no prediction matches"):
        evaluate_folders(tmp_path / "empty", truth_dir, {"one": 1})


def test_sitk_arrays_come_in_the_index_order_nibabel_reads():
    rng = np.random.default_rng(0)
    itk = sitk.GetImageFromArray(rng.integers(0, 100, (2, 3, 4)).astype(np.int16))  # SimpleITK size (4, 3, 2)
    field = sitk.GetImageFromArray(rng.random((2, 3, 4, 3)), isVector=True)
    array, vectors = sitk_to_dhw(itk), sitk_to_dhw(field)
    assert array.shape == (4, 3, 2) and vectors.shape == (4, 3, 2, 3)
    for i, j, k in [(0, 0, 0), (3, 1, 0), (2, 2, 1)]:
        assert array[i, j, k] == itk.GetPixel(i, j, k)
        np.testing.assert_allclose(vectors[i, j, k], field.GetPixel(i, j, k))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(dhw_to_sitk(array)), sitk.GetArrayFromImage(itk))
    np.testing.assert_array_equal(sitk_to_dhw(field, view=True), vectors)  # the same, without a copy


def test_arrays_read_from_many_threads_at_once_come_back_whole(tmp_path, thread_switches_in_gc):
    """The server reads cached arrays from many request threads. numpy parses every header with
    ``ast.literal_eval``, which CPython 3.11 cannot run on two threads at once (a bare ``np.load`` here
    fails with "AST constructor recursion depth mismatch" within a fraction of a second): the package's
    readers never fail and return every array whole, memory-mapped or in memory."""
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.float16).reshape(3, 4))
    np.savez(tmp_path / "b.npz", mean=np.ones(5), components=np.eye(3, dtype=np.float32))

    def work(_):
        for _ in range(200):
            mapped, whole, members = load_array(tmp_path / "a.npy"), load_array(tmp_path / "a.npy", mmap=False), load_arrays(tmp_path / "b.npz")
        return isinstance(mapped, np.memmap) and mapped.sum() == whole.sum() == 66 and members["components"].trace() == 3

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))
