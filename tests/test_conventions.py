"""The request conventions, tested once: IJK points, Slicer ROIs, 2D slice, resize, orientation."""
import numpy as np
import pytest
import SimpleITK as sitk

from clinlens.data.conventions import (
    OrientationMap,
    RequestError,
    ResizeMap,
    ijk_to_index,
    normalize_roi,
    parse_prompts,
    slice_2d,
)


def test_ijk_indexes_array_reversed():
    vol = np.zeros((4, 5, 6))  # [k, j, i]
    vol[3, 1, 2] = 7
    assert vol[ijk_to_index([2, 1, 3])] == 7


def test_slicer_roi_unsorted_pairs_are_sorted_and_half_open():
    roi = normalize_roi([40, 10, 30, 5, 3, 1], (64, 48, 8))
    assert roi.tolist() == [[10, 41], [5, 31], [1, 4]]


def test_roi_clipped_to_image_and_rejects_outside_or_zero_area():
    assert normalize_roi([-5, 10, 0, 200, 0, 0], (64, 48, 8)).tolist() == [[0, 11], [0, 48], [0, 1]]
    with pytest.raises(RequestError, match="does not overlap"):
        normalize_roi([100, 120, 0, 5, 0, 1], (64, 48, 8))
    with pytest.raises(RequestError, match="zero area"):
        normalize_roi([10, 10, 5, 20, 0, 0], (64, 48, 8))
    with pytest.raises(RequestError, match="must be"):
        normalize_roi([1, 2, 3], (64, 48, 8))


def test_points_rounded_and_checked_against_image_size():
    p = parse_prompts({"foreground": [[10.4, 20.6, 3]], "background": []}, (64, 48, 8), dimension=3)
    assert p.foreground.tolist() == [[10, 21, 3]]
    with pytest.raises(RequestError, match="outside the image"):
        parse_prompts({"foreground": [[64, 0, 0]]}, (64, 48, 8))
    with pytest.raises(RequestError, match="outside the image"):
        parse_prompts({"background": [[-1, 0, 0]]}, (64, 48, 8))
    with pytest.raises(RequestError, match="list of"):
        parse_prompts({"foreground": "10,20"}, (64, 48, 8))


def test_2d_image_accepts_k_zero_and_rejects_other_slices():
    p = parse_prompts({"foreground": [[3, 4, 0]], "roi": [1, 9, 2, 8, 0, 0]}, (64, 48))
    assert p.foreground.tolist() == [[3, 4]] and p.roi.tolist() == [[1, 10], [2, 9]]
    with pytest.raises(RequestError, match="image is 2D"):
        parse_prompts({"foreground": [[3, 4, 2]]}, (64, 48))


def test_2d_model_on_volume_takes_slice_from_points_or_param():
    assert parse_prompts({"foreground": [[3, 4, 5]]}, (64, 48, 8), dimension=2).slice == 5
    assert parse_prompts({"foreground": [[3, 4, 5]], "slice": 5}, (64, 48, 8), dimension=2).slice == 5
    with pytest.raises(RequestError, match="2D model"):
        parse_prompts({"foreground": [[3, 4, 5], [3, 4, 6]]}, (64, 48, 8), dimension=2)
    with pytest.raises(RequestError, match="out of range"):
        parse_prompts({"slice": 8}, (64, 48, 8), dimension=2)
    with pytest.raises(RequestError, match="integer"):
        parse_prompts({"slice": "abc"}, (64, 48, 8), dimension=2)


def test_resize_map_round_trip_on_non_square_image():
    m = ResizeMap(src_hw=(300, 500), dst_hw=(112, 112))
    pts = np.array([[0, 0], [499, 299], [250, 100]])
    back = m.points_from_model(m.points_to_model(pts))
    np.testing.assert_allclose(back, pts, atol=1e-9)
    # pixel centres: the image centre maps to the model centre
    np.testing.assert_allclose(m.points_to_model([[249.5, 149.5]]), [[55.5, 55.5]])
    prob = np.zeros((112, 112), np.float32)
    prob[:, :56] = 1  # left half in model space
    mask = m.mask_from_model(prob)
    assert mask.shape == (300, 500) and mask[:, :240].all() and not mask[:, 260:].any()


def _volume(direction):
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = sitk.GetImageFromArray(arr)
    img.SetDirection(direction)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 5.0))
    return arr, img


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (0, 1, 0, 1, 0, 0, 0, 0, -1)])
@pytest.mark.parametrize("target", ["RAS", "LPS"])
def test_orientation_map_follows_the_voxel(direction, target):
    arr, img = _volume(direction)
    om = OrientationMap(img, target)
    out = sitk.GetArrayFromImage(om.image)
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 0)]:
        t = om.to_target(ijk)
        assert out[ijk_to_index(t)] == arr[ijk_to_index(ijk)]
        assert om.to_source(t) == ijk


def test_slice_2d():
    vol = np.random.rand(5, 6, 7)
    assert slice_2d(vol, 2).shape == (6, 7) and np.array_equal(slice_2d(vol, 2), vol[2])
    assert slice_2d(vol, None).shape == (6, 7)
    rgb = np.zeros((6, 7, 3))
    assert slice_2d(rgb, None, is_rgb=True) is rgb
    with pytest.raises(RequestError):
        slice_2d(vol, 9)


def test_number_option_parses_viewer_strings_and_names_bad_values():
    from clinlens.data.conventions import RequestError, number_option

    assert number_option({"alpha": "0.3"}, "alpha", 0.2, float, 0, 1) == 0.3  # Slicer sends strings
    assert number_option({}, "levels", 4, int, 1, 20) == 4
    with pytest.raises(RequestError, match="'levels' must be a number"):
        number_option({"levels": "many"}, "levels", 4, int)
    with pytest.raises(RequestError, match=r"'alpha' must be in \[0, 1\], got 2.0"):
        number_option({"alpha": 2}, "alpha", 0.2, float, 0, 1)
    for bad, kind in (("nan", float), (float("inf"), float), (float("inf"), int), ("-inf", float)):
        with pytest.raises(RequestError, match="must be a finite number"):  # NaN passes every range check
            number_option({"x": bad}, "x", 1, kind, 0)


def test_choice_option_takes_slicers_untouched_list_and_names_bad_values():
    from clinlens.data.conventions import RequestError, choice_option

    assert choice_option({"contrast": ["vocabulary", "negation"]}, "contrast", "x") == "vocabulary"  # Slicer's box
    assert choice_option({"contrast": []}, "contrast", "negation") == "negation"
    assert choice_option({}, "method", "medgrad", ("medgrad", "grad_eclip")) == "medgrad"
    assert choice_option({"method": "grad_eclip"}, "method", "medgrad", ("medgrad", "grad_eclip")) == "grad_eclip"
    with pytest.raises(RequestError, match=r"'method' must be one of \['medgrad', 'grad_eclip'\], got 'gradcam'"):
        choice_option({"method": "gradcam"}, "method", "medgrad", ("medgrad", "grad_eclip"))
