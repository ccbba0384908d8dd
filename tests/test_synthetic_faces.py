"""The procedural face renderer: determinism, variety, sizes, and labels that show in the pixels."""

import numpy as np
import pytest

import stage1_tokenizer.synthetic_faces as synthetic_faces
from stage1_tokenizer.synthetic_faces import (
    ATTRIBUTE_NAMES,
    NUM_CLASSES_PER_ATTRIBUTE,
    face_attributes,
    render_face,
    sample_face_params,
)


def changed_rows(a: np.ndarray, b: np.ndarray, threshold: int = 24) -> np.ndarray:
    """Rows where two renders differ by more than ``threshold`` in some pixel channel."""
    diff = np.abs(a.astype(int) - b.astype(int)).max(axis=2)
    return np.flatnonzero((diff > threshold).any(axis=1))


def test_same_seed_and_index_give_the_same_face_in_any_call_order():
    first, first_attributes = render_face(3, 17, 64)
    for index in (0, 5, 99):
        render_face(3, index, 64)
    again, again_attributes = render_face(3, 17, 64)
    np.testing.assert_array_equal(first, again)
    assert first_attributes == again_attributes


def test_different_indices_and_seeds_give_different_faces():
    faces = [render_face(0, i, 64)[0].astype(float) for i in range(8)] + [render_face(1, 0, 64)[0].astype(float)]
    for i in range(len(faces)):
        for j in range(i + 1, len(faces)):
            assert np.abs(faces[i] - faces[j]).mean() > 10.0, (i, j)


def test_every_attribute_class_occurs_and_attributes_are_well_typed():
    attributes = [face_attributes(sample_face_params(0, i)) for i in range(400)]
    for name in ATTRIBUTE_NAMES:
        values = [a[name] for a in attributes]
        assert set(int(v) for v in values) == set(range(NUM_CLASSES_PER_ATTRIBUTE[name])), name
    assert all(isinstance(a["smiling"], bool) and isinstance(a["hair_colour"], int) for a in attributes)
    smiling = np.mean([a["smiling"] for a in attributes])
    assert 0.4 < smiling < 0.6


@pytest.mark.parametrize("size", [32, 64, 128])
def test_sizes_dtype_and_range(size):
    image, attributes = render_face(0, 1, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert image.max() - image.min() > 150  # dark pupils and light sclera at every size
    assert set(attributes) == set(ATTRIBUTE_NAMES)


@pytest.mark.parametrize("index", range(3))
def test_a_face_is_the_same_at_every_size_and_its_edges_are_anti_aliased(index):
    # A 256 px render box-filtered to 64 px approximates the exact pixel coverage. A renderer with hard
    # edges differs from it by tens of levels along every edge (measured: 99th percentile 44-78, mean
    # 2.9-4.1); one with soft edges stays close (9-15, 0.6-0.8).
    small = render_face(0, index, 64)[0].astype(float)
    large = render_face(0, index, 256)[0].astype(float).reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    difference = np.abs(small - large).max(axis=2)
    assert difference.mean() < 1.5
    assert np.percentile(difference, 99) < 25


@pytest.mark.parametrize("index", range(6))
def test_glasses_show_around_the_eyes_and_a_smile_below_them(index):
    params = sample_face_params(0, index)
    base = render_face(0, index, 96, overrides={"glasses": False, "smiling": False})[0]
    eye_colour = (params.eye_colour + 1) % NUM_CLASSES_PER_ATTRIBUTE["eye_colour"]
    irises = changed_rows(base, render_face(0, index, 96, overrides={"glasses": False, "smiling": False,
                                                                        "eye_colour": eye_colour})[0], 8)
    glasses = changed_rows(base, render_face(0, index, 96, overrides={"glasses": True, "smiling": False})[0])
    smile = changed_rows(base, render_face(0, index, 96, overrides={"glasses": False, "smiling": True})[0])
    assert irises.size and glasses.size and smile.size
    # Glasses: a band no taller than a quarter of the picture that contains the irises.
    assert glasses.min() <= irises.min() and glasses.max() >= irises.max()
    assert glasses.max() - glasses.min() < 96 // 4
    # The mouth lies entirely below the eyes.
    assert smile.min() > irises.max()


def test_skin_tone_override_changes_brightness_in_the_right_direction():
    light = render_face(0, 4, 64, overrides={"skin_tone": 0})[0].astype(float)
    dark = render_face(0, 4, 64, overrides={"skin_tone": 4})[0].astype(float)
    changed = np.abs(light - dark).max(axis=2) > 24
    assert changed.mean() > 0.05
    assert light[changed].mean() > dark[changed].mean() + 60


def test_overrides_leave_the_attributes_they_do_not_name():
    attributes = render_face(0, 9, 32)[1]
    overridden = render_face(0, 9, 32, overrides={"glasses": not attributes["glasses"]})[1]
    assert overridden == {**attributes, "glasses": not attributes["glasses"]}


@pytest.mark.parametrize(
    "call",
    [
        lambda: render_face(0, 0, 31),
        lambda: render_face(-1, 0, 64),
        lambda: render_face(0, 1.5, 64),
        lambda: render_face(0, 0, 64, overrides={"moustache": True}),
        lambda: render_face(0, 0, 64, overrides={"hair_style": 4}),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_drawing_parts_on_crops_changes_no_pixel(monkeypatch):
    # Reference: every part evaluated over the whole picture (the obviously right, ~2x slower way).
    sizes = (32, 64, 97)
    cropped = [render_face(0, i, s)[0] for i in range(12) for s in sizes]
    monkeypatch.setattr(synthetic_faces._Canvas, "crop", lambda self, *bounds: self)
    whole = [render_face(0, i, s)[0] for i in range(12) for s in sizes]
    for a, b in zip(cropped, whole):
        np.testing.assert_array_equal(a, b)


def test_overriding_an_attribute_with_its_own_value_changes_nothing():
    image, attributes = render_face(0, 11, 48)
    same, same_attributes = render_face(0, 11, 48, overrides=dict(attributes))
    np.testing.assert_array_equal(image, same)
    assert same_attributes == attributes
