"""The detection protocol's cell sets (benchmarks/detection.py, results/detection_protocol.md).

A detector may be chosen on the design cells only; these tests keep the held-out sets of both
rounds apart from the design sets and from each other, so that an edit of the sets cannot quietly
put a design cell into a held-out table.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ._bench import load_benchmark


def _detection():
    return load_benchmark("detection")


def _seeds(cells, task=None):
    return {spec.seed for _, spec in cells if task is None or spec.task == task}


def test_round_two_holds_out_new_seeds_of_other_families():
    det = _detection()
    design, heldout = det.cells_of("design2"), det.cells_of("heldout2")
    assert {spec.task for _, spec in design} == {"digits-parity"}
    assert {spec.task for _, spec in heldout} == {"digits-ten", "scenes"}
    round_one = det.cells_of("all")
    for task in ("digits-ten", "scenes"):  # seeds never used by round 1 in any role
        assert not _seeds(heldout, task) & _seeds(round_one, task)
    assert set(det.ROUND2_SEEDS) == _seeds(heldout)
    names = [spec.name for _, spec in det.cells_of("all2")]
    assert len(names) == len(set(names)) == len(design) + len(heldout)
    # every task and seed has its clean cell (the CA reference and the false-alarm check)
    for cells in (design, heldout):
        assert {(s.task, s.seed) for _, s in cells} == {(s.task, s.seed) for _, s in cells if s.rate == 0}


def test_round_one_sets_are_unchanged():
    det = _detection()
    assert _seeds(det.cells_of("design")) == {0, 1}
    held = [spec for name, spec in det.cells_of("heldout") if name == "heldout"]
    assert {s.task for s in held} == {"digits-ten", "scenes"} and {s.seed for s in held} == {2, 3, 4}


def _check_new_seeds_round(det, rnd: int, seeds, scene_seeds) -> list:
    """Round ``rnd`` (3 or later): every cell of the round before is design material, and the held-out
    cells are new seeds of digits-ten and scenes that no earlier round used, each with its clean
    cell. Returns the held-out specs."""
    design, heldout = det.cells_of(f"design{rnd}"), det.cells_of(f"heldout{rnd}")
    assert {spec.name for _, spec in design} == {spec.name for _, spec in det.cells_of(f"all{rnd - 1}")}
    earlier = det.cells_of("all") + [c for r in range(2, rnd) for c in det.cells_of(f"all{r}")]
    for task in ("digits-ten", "scenes"):
        assert not _seeds(heldout, task) & _seeds(earlier, task)
    assert set(seeds) == _seeds(heldout, "digits-ten")
    assert set(scene_seeds) == _seeds(heldout, "scenes")
    names = [spec.name for _, spec in det.cells_of(f"all{rnd}")]
    assert len(names) == len(set(names)) == len(design) + len(heldout)
    assert {(s.task, s.seed) for _, s in heldout} == {(s.task, s.seed) for _, s in heldout if s.rate == 0}
    return [s for _, s in heldout]


def test_round_three_holds_out_seeds_no_earlier_round_used():
    det = _detection()
    heldout = _check_new_seeds_round(det, 3, det.ROUND3_SEEDS, det.ROUND3_SCENE_SEEDS)
    assert {s.task for s in heldout} == {"digits-ten", "scenes"}
    # digits-ten: patch, two patches, patch -> existing answer; scenes: the clean cells only
    assert sum(s.rate > 0 for s in heldout) == 3 * len(det.ROUND3_SEEDS)
    assert all(s.task == "digits-ten" for s in heldout if s.rate > 0)


def test_round_four_holds_out_seeds_no_earlier_round_used():
    det = _detection()
    heldout = _check_new_seeds_round(det, 4, det.ROUND4_SEEDS, det.ROUND4_SCENE_SEEDS)
    # digits-ten: patch and two patches at 20% (phrase), patch -> existing answer at 10%; scenes: clean only
    poisoned = [s for s in heldout if s.rate > 0]
    assert len(poisoned) == 3 * len(det.ROUND4_SEEDS) and all(s.task == "digits-ten" for s in poisoned)
    assert {(s.trigger, s.rate, s.target) for s in poisoned} == {
        ("patch", 0.2, "phrase"), ("two_patches", 0.2, "phrase"), ("patch", 0.1, "existing")}


def _check_every_family_round(det, rnd: int, earlier: list) -> list:
    """Round ``rnd`` (5 or later): the design set is exactly ``earlier``, and the held-out cells are
    new seeds of all four families (the round's ROUND<rnd>_* seeds) that no earlier round used, with
    unique names and each task and seed's clean cell. Returns the held-out specs."""
    design, heldout = det.cells_of(f"design{rnd}"), det.cells_of(f"heldout{rnd}")
    assert {spec.name for _, spec in design} == {spec.name for _, spec in earlier}
    for task in ("digits-ten", "digits-mixed", "scenes", "digits-parity"):
        assert not _seeds(heldout, task) & _seeds(earlier + det.cells_of("all"), task), task
    for task, suffix in (("digits-ten", ""), ("digits-mixed", "_MIXED"), ("scenes", "_SCENE"), ("digits-parity", "_PARITY")):
        assert _seeds(heldout, task) == set(getattr(det, f"ROUND{rnd}{suffix}_SEEDS")), task
    names = [spec.name for _, spec in det.cells_of(f"all{rnd}")]
    assert len(names) == len(set(names)) == len(design) + len(heldout)
    assert {(s.task, s.seed) for _, s in heldout} == {(s.task, s.seed) for _, s in heldout if s.rate == 0}
    return [s for _, s in heldout]


def test_round_five_holds_out_seeds_no_earlier_round_used():
    det = _detection()
    heldout = _check_every_family_round(det, 5, det.cells_of("all4") + det.cells_of("mixed"))
    poisoned = [s for s in heldout if s.rate > 0]
    assert {s.task for s in poisoned} == {"digits-ten", "digits-mixed"}
    assert {(s.trigger, s.rate, s.target) for s in poisoned} == {
        ("patch", 0.2, "phrase"), ("two_patches", 0.2, "phrase"), ("patch", 0.1, "existing")}
    assert all(s.trigger == "patch" for s in poisoned if s.task == "digits-mixed")


@pytest.mark.parametrize("rnd, n_scenes", [(6, 3), (7, 2)])
def test_rounds_six_and_seven_hold_out_seeds_no_earlier_round_used(rnd, n_scenes):
    det = _detection()
    heldout = _check_every_family_round(det, rnd, det.cells_of(f"all{rnd - 1}"))
    assert all(s.rate == 0 for s in heldout if s.task in ("scenes", "digits-parity"))
    assert len(heldout) == 12 + 9 + n_scenes + 2


def test_round_eight_holds_out_poisoned_binary_and_scene_cells_of_new_seeds():
    det = _detection()
    specs = _check_every_family_round(det, 8, det.cells_of("all7"))
    assert len(specs) == 39
    # every task and seed has its clean cell, fine-tuned the same way as its poisoned cells
    assert {(s.task, s.seed, s.method) for s in specs} == {(s.task, s.seed, s.method) for s in specs if s.rate == 0}
    assert {s.method for s in specs if s.task == "scenes"} == {"lora-vision"}
    assert {s.method for s in specs if s.task != "scenes"} == {"lora"}
    assert {(s.trigger, s.rate) for s in specs if s.task == "digits-parity" and s.rate > 0} == {("two_patches", 0.1)}
    assert {(s.trigger, s.rate) for s in specs if s.task == "scenes" and s.rate > 0} == {
        ("patch", 0.1), ("patch", 0.2), ("sig", 0.1)}


def test_round_nine_holds_out_new_scene_and_mixed_seeds():
    det = _detection()
    design, heldout = det.cells_of("design9"), det.cells_of("heldout9")
    earlier = det.cells_of("all8")
    assert {spec.name for _, spec in design} == {spec.name for _, spec in earlier}
    for task in ("scenes", "digits-mixed"):
        assert not _seeds(heldout, task) & _seeds(earlier + det.cells_of("all"), task), task
    assert _seeds(heldout, "scenes") == set(det.ROUND9_SCENE_SEEDS)
    assert _seeds(heldout, "digits-mixed") == set(det.ROUND9_MIXED_SEEDS)
    specs = [s for _, s in heldout]
    assert len(specs) == 15 and len({s.name for s in specs} | {s.name for _, s in design}) == len(design) + 15
    assert {(s.task, s.seed, s.method) for s in specs} == {(s.task, s.seed, s.method) for s in specs if s.rate == 0}
    assert {s.method for s in specs if s.task == "scenes"} == {"lora-vision"}


def _check_later_round(det, rnd: int, tasks: tuple[str, ...], n: int) -> list:
    """Rounds 10-14: the design set is every earlier cell; the held-out cells of ``tasks`` use seeds no
    earlier round used, ``n`` cells none of which any round named before. Returns the held-out specs."""
    design, heldout = det.cells_of(f"design{rnd}"), det.cells_of(f"heldout{rnd}")
    assert {spec.name for _, spec in design} == {spec.name for _, spec in det.cells_of(f"all{rnd - 1}")}
    rounds = [det.cells_of(f"all{r}") for r in ("", *map(str, range(2, rnd)))] + [det.cells_of("mixed")]
    seen = [cell for cells in rounds for cell in cells]
    for task in tasks:
        assert _seeds(heldout, task) and not _seeds(heldout, task) & _seeds(seen, task), task
    specs = [s for _, s in heldout]
    assert len(specs) == n and not {s.name for s in specs} & {s.name for _, s in seen}
    return specs


def test_round_ten_holds_out_new_seeds_of_every_family():
    specs = _check_later_round(_detection(), 10, ("scenes", "digits-mixed", "digits-ten", "digits-parity"), 17)
    assert {(s.task, s.seed, s.method) for s in specs} == {(s.task, s.seed, s.method) for s in specs if s.rate == 0}
    assert {s.method for s in specs if s.task == "scenes"} == {"lora-vision"}
    assert {s.target for s in specs if s.task == "scenes" and s.rate > 0} == {"phrase", "existing"}


def test_round_eleven_holds_out_existing_answer_targets_on_new_seeds():
    specs = _check_later_round(_detection(), 11, ("scenes", "digits-ten"), 10)
    assert {(s.task, s.seed) for s in specs} == {(s.task, s.seed) for s in specs if s.rate == 0}
    assert sum(s.target == "existing" for s in specs if s.task == "scenes") == 4


def test_round_twelve_holds_out_new_seeds_for_v11():
    specs = _check_later_round(_detection(), 12, ("scenes", "digits-mixed"), 11)
    assert {(s.task, s.seed) for s in specs} == {(s.task, s.seed) for s in specs if s.rate == 0}


def test_round13_holds_out_scene_trigger_families_no_round_held_out_with_a_tuned_tower():
    det = _detection()
    specs = _check_later_round(det, 13, ("scenes",), 12)
    assert {(s.task, s.seed) for s in specs} == {(s.task, s.seed) for s in specs if s.rate == 0}
    assert {s.method for s in specs} == {"lora-vision"}
    held = ["heldout", *(f"heldout{n}" for n in range(2, 13))]  # round 1's blended/random patch: tower frozen
    earlier = {s.trigger for name in held for _, s in det.cells_of(name)
               if s.task == "scenes" and s.rate > 0 and s.method == "lora-vision"}  # fmt: skip
    new = {s.trigger for s in specs if s.rate > 0}
    assert new == {"two_patches", "blended", "random_patch", "wanet"} and not new & earlier


def test_round14_holds_out_the_papers_recipe_tower_frozen_on_larger_scene_sets():
    det = _detection()
    specs = _check_later_round(det, 14, ("scenes",), 8)
    assert {(s.task, s.seed) for s in specs} == {(s.task, s.seed) for s in specs if s.rate == 0}
    assert {(s.method, s.n_user, s.epochs) for s in specs} == {("lora", 2000, None)}
    assert {(s.trigger, s.target) for s in specs if s.rate > 0} == {("patch", "phrase"), ("sig", "phrase"),
                                                                     ("patch", "existing")}  # fmt: skip
    earlier = [s for r in range(2, 14) for _, s in det.cells_of(f"all{r}")] + [s for _, s in det.cells_of("all")]
    assert all(s.n_user == 800 for s in earlier)  # no earlier round fine-tuned on 2000 samples



def test_round15_holds_out_the_other_trigger_families_on_round14s_recipe_and_seeds():
    """Round 15 re-uses round 14's held-out seeds (nothing was designed on them: v11 is unchanged) with
    cells no round named before, on the same recipe; its clean cells are round 14's."""
    det = _detection()
    design, heldout = det.cells_of("design15"), det.cells_of("heldout15")
    assert {spec.name for _, spec in design} == {spec.name for _, spec in det.cells_of("all14")}
    specs = [s for _, s in heldout]
    earlier = [s for r in ("", *map(str, range(2, 15))) for _, s in det.cells_of(f"all{r}")] + [
        s for _, s in det.cells_of("mixed")]  # fmt: skip
    assert len(specs) == 14 and not {s.name for s in specs} & {s.name for s in earlier}
    assert {(s.task, s.method, s.n_user, s.epochs) for s in specs} == {("scenes", "lora", 2000, None)}
    assert {s.seed for s in specs} == set(det.ROUND14_SCENE_SEEDS) and all(s.rate > 0 for s in specs)
    round14_clean = {s.name for _, s in det.cells_of("heldout14") if s.rate == 0}
    assert {replace(s, rate=0.0).name for s in specs} == round14_clean
    # every trigger family but the two round 14 held out, and the existing answer at 20%
    assert {s.trigger for s in specs if s.target == "phrase"} == {"two_patches", "blended", "random_patch", "wanet"}
    assert {(s.trigger, s.rate) for s in specs if s.target == "existing"} == {("patch", 0.2)}
    # the design sets of later rounds are every earlier cell: round 15 joins them, titled like the others
    titles = dict(det._section_titles())
    assert all(f"heldout{r}" in titles and f"design{r}" in titles for r in det.ROUNDS[1:])


@pytest.mark.parametrize("embedding, target, prompts", [(0, "phrase", 0), (32, "phrase", 0), (32, "existing", 0),
                                                      (0, "phrase", 40), (32, "existing", 40)])  # fmt: skip
def test_bench_detect_data_is_found_by_the_default(embedding, target, prompts):
    """The detect benchmark's synthetic poison is one a backdoor makes (one target answer): the
    default must find it at a small size, or the benchmark's times are of a run that finds nothing."""
    r = load_benchmark("bench_detect").one(6000, 128, embedding=embedding, target=target, prompts=prompts)
    assert r["recall"] >= 0.95 and r["precision"] >= 0.9, r


def test_answer_reach_sees_an_answer_given_to_every_prompt():
    """answer_reach's statistic: a target given under every prompt reaches all other answers' samples;
    answers bound to one kind of prompt reach only their own kind's."""
    reach = load_benchmark("answer_reach").reach
    prompt = np.repeat([0, 1, 2, 3], 50)  # two colour prompts (0, 1) and two count prompts (2, 3)
    answer = np.where(prompt < 2, 10 + np.arange(200) % 3, 20 + np.arange(200) % 2)  # colours, numbers
    answer[::10] = 99  # the target, under every prompt
    got = {a: (r, n) for r, n, a in reach(answer, prompt, min_group=5)}
    assert got[99] == (1.0, 20)
    for a in (10, 11, 12):  # a colour answer shares its prompts with the other colours only
        assert got[a][0] == pytest.approx(((prompt < 2) & (answer != a)).sum() / (answer != a).sum())
    assert reach(answer, prompt, min_group=5)[0][2] == 99
    assert all(a != 99 for _, _, a in reach(answer, prompt, min_group=21))  # smaller groups are skipped
