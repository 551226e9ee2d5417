"""The place-word check of benchmarks/binding.py: the share of a caption's colour in its stated quadrant.

Its number backs a claim in docs/results.md (the shipped base ignores "at the top left" entirely), so it is checked
on samplers whose behaviour is known: one that obeys the place word, one that ignores it, one that swaps it.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from binding import (CHECKS, bound_pair, by_objects, check_table, colour_binding, paired,  # noqa: E402
                     place_effect, quadrant_shares)

from rewards.scenes import POSITIONS, Scene, SceneObject, parse_caption, render  # noqa: E402

SIDE = 32


def renderer(where):
    """generate_images for place_effect: row k of a batch draws the caption's object at where(stated place, k)."""
    def generate_images(captions, seed):
        rng = np.random.default_rng(seed)
        images = []
        for k, caption in enumerate(captions):
            obj = parse_caption(caption).objects[0]
            placed = SceneObject(obj.colour, obj.shape, obj.size, where(obj.position, k))
            images.append(render(Scene("black", (placed,)), SIDE, rng))
        return np.stack(images)
    return generate_images


def test_quadrant_shares_are_the_colours_fraction_in_each_quadrant():
    image = render(Scene("black", (SceneObject("red", "square", "large", "top left"),
                                   SceneObject("blue", "circle", "large", "bottom right"))), SIDE)[None]
    assert quadrant_shares(image, "red")["top left"] == 1.0
    assert quadrant_shares(image, "red")["bottom right"] == 0.0
    assert quadrant_shares(image, "blue")["bottom right"] == 1.0
    assert np.isnan(quadrant_shares(image, "green")["top left"])  # a colour that is not drawn has no share


def test_obeying_ignoring_and_swapping_the_place_word_give_one_a_quarter_and_zero():
    noises = 4
    obeyed, control, halves = place_effect(renderer(lambda stated, k: stated), noises)
    assert np.allclose(obeyed, 1.0) and np.allclose(control, 0.0) and np.allclose(halves, 1.0)
    # Row k draws at quadrant k mod 4 whatever the caption says: a sampler whose layout is its noise's alone.
    ignored, control, halves = place_effect(renderer(lambda stated, k: POSITIONS[k % 4]), noises)
    assert np.allclose(ignored, 0.25) and np.allclose(control, 0.25) and np.allclose(halves, 0.5)
    mirrored = {"top left": "top right", "top right": "top left", "bottom left": "bottom right",
                "bottom right": "bottom left"}
    swapped, control, halves = place_effect(renderer(lambda stated, k: mirrored[stated]), noises)
    assert np.allclose(swapped, 0.0) and np.allclose(control, 1 / 3)
    # left and right exchanged, top and bottom kept: the axes tell the two words apart (a model that learned the
    # vertical word and not the horizontal one shows 1 and 0.5; swapping the halves' columns fails here)
    assert np.allclose(halves[:, 0], 1.0) and np.allclose(halves[:, 1], 0.0)
    flipped = {"top left": "bottom left", "top right": "bottom right", "bottom left": "top left",
               "bottom right": "top right"}
    _, _, halves = place_effect(renderer(lambda stated, k: flipped[stated]), noises)
    assert np.allclose(halves[:, 0], 0.0) and np.allclose(halves[:, 1], 1.0)


def test_paired_differences_match_prompts_and_drop_those_either_sampler_lacks():
    """binding.py's --against and lift columns: a - b per prompt, over prompts both have. Would catch dropping each
    side's missing prompts separately (the rest then misaligned: 1 - 0, 0.5 - 0.5, 0 - 1, 0.5 - 0.5, mean 0)."""
    a = np.array([1.0, 0.5, np.nan, 0.0, 0.5])
    b = np.array([0.0, 0.5, 1.0, np.nan, 0.5])
    kept, diff = paired(a, b)
    assert kept.tolist() == [True, True, False, False, True]
    assert diff.mean == pytest.approx((1.0 + 0.0 + 0.0) / 3)


def test_a_check_no_prompt_states_gets_a_row_of_dashes_and_the_others_their_numbers():
    """Few prompts may state no place at all: that check's row is dashes (it stopped the script, after all the
    sampling, with bootstrap_ci's empty-input error) while every other check is still reported and paired."""
    n = 4
    own = {name: np.array([1.0, 0.0, 1.0, 1.0]) for name in CHECKS}
    control = {name: np.array([0.0, 0.0, 1.0, 0.0]) for name in CHECKS}
    other = {name: np.array([0.0, 0.0, 0.0, 0.0]) for name in CHECKS}
    own["colour at its stated place"] = np.full(n, np.nan)
    rows, against_rows, results = check_table(own, control, other, "builtin:x")
    empty = CHECKS.index("colour at its stated place")
    assert rows[empty] == "| colour at its stated place | 0 | - | - | - |"
    assert against_rows[empty] == "| colour at its stated place | 0 | - |"
    assert results["colour at its stated place"] == {"prompts": 0, "against": {"init": "builtin:x", "prompts": 0}}
    full = results["background"]
    assert full["prompts"] == n and full["own"]["mean"] == pytest.approx(0.75)
    assert full["lift"]["mean"] == pytest.approx(0.5) and full["against"]["difference"]["mean"] == pytest.approx(0.75)
    assert len(rows) == len(against_rows) == len(CHECKS)


def test_the_verifier_is_split_by_how_many_objects_each_caption_states():
    """binding.py's split of the verifier by objects stated (the base loses its held-out reward on two-object
    captions): each kind over all of its prompts. Would catch a caption counted in the wrong kind, or the split
    taken over the prompts paired with a neighbour (as the chance column is: it kept 22 and 34 of 128)."""
    captions = ["a red circle at the top left", "a red circle and a blue square, on a white background",
                "a small green triangle, on a black background", "a red square and a blue circle and a cyan square"]
    split = by_objects(np.array([1.0, 0.25, 0.75, 0.5]), captions)
    assert split["one object"]["prompts"] == 2 and split["one object"]["mean"] == pytest.approx(0.875)
    assert split["two or more objects"]["prompts"] == 2 and split["two or more objects"]["mean"] == pytest.approx(0.375)
    assert by_objects(np.array([1.0]), captions[:1])["two or more objects"] == {"prompts": 0}


def test_a_runs_gain_is_split_by_how_many_objects_each_caption_states(tmp_path):
    """benchmarks/gain_by_objects.py on a held_out_scores.json with a known change per kind of caption: +0.2 on the
    two-object ones, 0 on the others; two runs of one recipe pool per prompt. Would catch before and after swapped,
    the kinds mixed up, or runs pooled across different prompts."""
    from gain_by_objects import change_by_objects, main

    prompts = ["a red circle at the top left", "a red circle and a blue square", "a small green triangle",
               "a red square and a blue circle, on a white background"]
    before = np.array([[0.9, 1.0], [0.4, 0.5], [1.0, 1.0], [0.3, 0.5]])
    after = before + np.array([[0.0], [0.2], [0.0], [0.2]])
    scores = {"prompts": prompts, "seeds": 2, "before": {"total": before.tolist()}, "after": {"total": after.tolist()}}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "held_out_scores.json").write_text(json.dumps(scores))
    _, change, split = change_by_objects(scores, "total")
    assert split["all prompts"]["mean"] == pytest.approx(0.1)
    assert split["one object"]["mean"] == pytest.approx(0.0) and split["one object"]["prompts"] == 2
    assert split["two or more objects"]["mean"] == pytest.approx(0.2)
    other = dict(scores, after={"total": (before + 0.1).tolist()})
    (tmp_path / "b.json").write_text(json.dumps(other))
    text = main([str(tmp_path / "a"), str(tmp_path / "b.json")])
    assert "pooled over 2 runs | +0.100" in text and "+0.150" in text  # two-object: (0.2 + 0.1) / 2
    (tmp_path / "c.json").write_text(json.dumps(dict(other, prompts=prompts[::-1])))
    assert "pooled" not in main([str(tmp_path / "a"), str(tmp_path / "c.json")])  # other prompts: not pooled
    # Recipes paired by seed: a's final scores minus b's (+0.1 on two-object captions, -0.1 on the others).
    _, _, paired = change_by_objects(scores, "total", other)
    assert paired["two or more objects"]["mean"] == pytest.approx(0.1)
    assert paired["one object"]["mean"] == pytest.approx(-0.1)
    text = main([str(tmp_path / "a"), "--against", str(tmp_path / "b.json")])
    assert "| -0.100 [-0.100, -0.100] (2) | +0.100 [" in text
    with pytest.raises(SystemExit, match="same seed order"):  # another start (or seed) is not a pair
        change_by_objects(scores, "total", dict(other, before={"total": (before + 0.01).tolist()}))
    # An evaluation between start and end (every grpo.eval_every) stands as the after with --step.
    (tmp_path / "d.json").write_text(json.dumps(dict(scores, during={"10": {"total": (before + 0.3).tolist()}})))
    assert "| +0.300 [+0.300, +0.300] (4) |" in main([str(tmp_path / "d.json"), "--step", "10"])
    assert "| +0.100 [" in main([str(tmp_path / "d.json")])  # the final scores without --step
    with pytest.raises(SystemExit, match=r"no evaluation at step 20; it has steps \[10\]"):
        main([str(tmp_path / "d.json"), "--step", "20"])


def test_colour_binding_tells_bound_colours_from_colours_placed_at_random():
    """binding.py's colour binding (the base places two stated colours at their own places as often as at each
    other's: chance): a renderer that binds scores own 1, swapped 0; one that swaps, 0 and 1; one that alternates,
    0.5 and 0.5. Would catch the swapped check reading the own places (or the own the swapped), or a caption
    without two stated places counted."""
    captions = ["a red circle at the top left and a blue square at the bottom right",
                "a large green triangle at the top right and a small cyan circle at the bottom left, on a white "
                "background",
                "a red circle at the top left and a blue square",  # one place stated
                "a red circle at the top left and a red square at the bottom right",  # one colour
                "a red circle at the top left"]
    assert [bound_pair(c) is not None for c in captions] == [True, True, False, False, False]

    def draw(swap_when):
        images = []
        for caption in captions:
            scene = parse_caption(caption)
            row = []
            for k in range(4):
                objects = list(scene.objects)
                if len(objects) == 2 and objects[0].position and objects[1].position and swap_when(k):
                    a, b = objects
                    objects = [SceneObject(a.colour, a.shape, "large", b.position),
                               SceneObject(b.colour, b.shape, "large", a.position)]
                placed = [SceneObject(o.colour, o.shape, "large", o.position or "bottom right") for o in objects]
                row.append(render(Scene("black", tuple(placed)), SIDE))
            images.append(np.stack(row))
        return np.stack(images)

    for swap_when, own, swapped in ((lambda k: False, 1.0, 0.0), (lambda k: True, 0.0, 1.0),
                                    (lambda k: k % 2 == 1, 0.5, 0.5)):
        bound, crossed = colour_binding(draw(swap_when), captions)
        assert np.allclose(bound[:2], own) and np.allclose(crossed[:2], swapped)
        assert np.isnan(bound[2:]).all() and np.isnan(crossed[2:]).all()
