"""DICOM conversions without a server: a real MR series to NIfTI, a label to DICOM SEG and back."""

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from orthanc_harness import SHARED_DICOM
from semisam_o1.server.dicomweb import SourceError, label_to_seg, seg_to_label, series_to_nifti

SERIES = SHARED_DICOM / "Study1" / "13_HCropVolume"
pytestmark = pytest.mark.skipif(not SERIES.is_dir(), reason=f"{SERIES} absent")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    uid = pydicom.dcmread(str(next(SERIES.glob("*.dcm"))), stop_before_pixels=True).SeriesInstanceUID
    return series_to_nifti(SERIES, tmp_path_factory.mktemp("dicom") / "image.nii.gz", uid)


def _label(image, tmp_path, fill) -> tuple:
    reference = sitk.ReadImage(str(image))
    array = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    fill(array, sitk.GetArrayViewFromImage(reference))
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(reference)
    sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
    return tmp_path / "label.nii.gz", array


def test_a_label_saved_as_dicom_seg_reads_back_voxel_for_voxel(image, tmp_path):
    def two_classes(array, intensity):  # class 2 inside class 1, some slices left empty
        z = array.shape[0]
        body = intensity > np.percentile(intensity, 60)
        array[z // 4: 3 * z // 4][body[z // 4: 3 * z // 4]] = 1
        array[z // 3: z // 2][intensity[z // 3: z // 2] > np.percentile(intensity, 90)] = 2

    label, array = _label(image, tmp_path, two_classes)
    seg = label_to_seg(label, image, SERIES, {"anterior": 1, "posterior": 2}, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(str(seg))
    assert ds.Modality == "SEG"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["anterior", "posterior"]
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(str(next(SERIES.glob("*.dcm")))).SeriesInstanceUID
    back = sitk.ReadImage(str(seg_to_label(seg, image, tmp_path / "back.nii.gz")))
    assert back.GetSize() == sitk.ReadImage(str(image)).GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)


def test_an_empty_or_misfit_label_is_refused_422(image, tmp_path):
    empty, _ = _label(image, tmp_path, lambda array, intensity: None)
    with pytest.raises(SourceError, match="label is empty") as e:
        label_to_seg(empty, image, SERIES, {}, tmp_path / "seg.dcm")
    assert e.value.status_code == 422
    small = tmp_path / "small.nii.gz"
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8) + 1, str(small))
    with pytest.raises(SourceError, match="does not match the image") as e:
        label_to_seg(small, image, SERIES, {}, tmp_path / "seg.dcm")
    assert e.value.status_code == 422
