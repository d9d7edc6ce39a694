"""Certified robustness to adversarial patches (bagjax.robust) and the patch attack that checks it (bagjax.attack)."""

import itertools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import robust_reference
from bagjax import attack, patches, robust
from bagjax.errors import UserError
from bagjax.experiments import patch_robustness
from bagjax.models import create_model
from bagjax.workdir import load_trained
from trainutil import ROOT, file_and_moved_workdir, train_env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A two-step demo smoke run (BagNet-17 on synthetic:tiny at 64 px: a 6 x 6 grid), trained on Clipped
    BagNet logits (``config.robust.clip``): its workdir, loaded model and final eval metrics."""
    from configs import demo
    from bagjax.training.loop import train_and_evaluate

    config = demo.get_config("smoke")
    config.image_size = 64
    config.heatmap_images = 0
    config.robust.clip = "cbn:1,0"
    workdir = tmp_path_factory.mktemp("robust_smoke")
    metrics = train_and_evaluate(config, str(workdir))
    return workdir, load_trained(workdir), metrics


# ----------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("rf,stride", [(9, 8), (17, 8), (33, 8), (5, 2)])
def test_window_size_is_the_most_locations_any_patch_position_touches(rf, stride):
    size = 80
    n = (size - rf) // stride + 1
    for p in (1, 4, 7, 8, 9, 16, 23):
        counts = []
        for start in range(size - p + 1):
            touched = [i for i in range(n) if stride * i < start + p and stride * i + rf > start]
            lo, hi = robust.touched_range(start, p, rf, stride, n)
            if touched:
                assert (int(lo), int(hi)) == (touched[0], touched[-1] + 1)
            else:  # the image's last rows are seen by no location
                assert int(lo) == int(hi) and start + p > stride * (n - 1) + rf
            counts.append(len(touched))
        assert max(counts) == min(robust.window_size(p, rf, stride), n)


def test_window_equals_the_gradient_support_of_a_patch_on_a_real_bagnet():
    model = create_model("bagnet17", num_classes=3, width=8, stage_sizes=(1, 1, 1, 1))
    size, p = 48, 9
    images = jax.random.normal(jax.random.key(0), (3, size, size, 3))  # support: the union over three images
    variables = model.init(jax.random.key(1), images)
    gh, gw = patches.grid_shape(model, size, size)
    rf, stride = patches.receptive_field(model)
    # d(sum over images and classes of the logit at (i, j)) / d(images), for every location at once
    jac = jax.jit(jax.jacrev(lambda x: model.apply(variables, x, method="patch_logits").sum((0, 3))))(images)
    assert jac.shape == (gh, gw, 3, size, size, 3)
    extents = []
    for y0, x0 in [(0, 0), (size - p, size - p), (0, 20), (13, 27), (16, 16)]:
        support = np.asarray(jnp.abs(jac[:, :, :, y0:y0 + p, x0:x0 + p]).sum(axis=(2, 3, 4, 5)) > 0)
        (r0, r1), (c0, c1) = [tuple(int(v) for v in robust.touched_range(o, p, rf, stride, g))
                              for o, g in ((y0, gh), (x0, gw))]
        expected = np.zeros((gh, gw), bool)
        expected[r0:r1, c0:c1] = True
        np.testing.assert_array_equal(support, expected)  # exactly the locations whose box meets the patch
        extents += [r1 - r0, c1 - c0]
    assert max(extents) == robust.window_shape(model, p, size, size)[0] == robust.window_size(p, rf, stride)


# ----------------------------------------------------------------------------------------------- masking
def test_masked_logits_known_answer_and_ties():
    logits = np.zeros((3, 3, 3), np.float32)
    logits[..., 0] = 1.0  # spread evidence: total 9, best 2x2 window 4 -> 5 after masking
    logits[0, 0, 1] = 10.0  # one strong location: total 10, all of it masked -> 0
    logits[..., 2] = -4.0  # negative evidence is clipped to 0
    np.testing.assert_array_equal(robust.masked_logits(jnp.asarray(logits), (2, 2)), [5.0, 0.0, 0.0])
    assert int(jnp.argmax(logits.mean(axis=(0, 1)))) == 1 and int(jnp.argmax(robust.masked_logits(logits, (2, 2)))) == 0
    np.testing.assert_allclose(robust.masked_logits(logits, (2, 2)), robust_reference.masked_logits(logits, (2, 2)))
    np.testing.assert_array_equal(robust.masked_logits(logits, (2, 2), clip_max=0.5), [2.5, 0.0, 0.0])
    # detection threshold T: class 0's best window holds 4/9 < 0.5 of it, so it is not masked
    np.testing.assert_array_equal(robust.masked_logits(logits, (2, 2), threshold=0.5), [9.0, 0.0, 0.0])


def test_masking_certificate_known_answers_with_tie_and_border():
    logits = np.zeros((4, 4, 2), np.float32)
    logits[..., 0] = 1.0
    safe, margin = robust.masking_margins(jnp.asarray(logits), 0, (2, 2))
    # class 0 keeps 16 - 4 (the patch's window) - 4 (the largest remaining window) = 8, or 16 - 4 - 3 = 9 for
    # the centre window (every other window overlaps it); class 1 keeps at most 0
    np.testing.assert_array_equal(margin, [[8, 8, 8], [8, 9, 8], [8, 8, 8]])
    assert bool(safe.all())
    assert not bool(robust.masking_margins(jnp.asarray(logits), 1, (2, 2))[0].any())  # label 1 has no evidence
    tie = logits.copy()
    tie[:, 0, 1] = 2.0  # class 1: 8 in the border column; a patch there can hide half of it
    safe, margin = robust.masking_margins(jnp.asarray(tie), 0, (2, 2))
    np.testing.assert_array_equal(margin, [[4, 0, 0], [4, 1, 0], [4, 0, 0]])
    # an exact tie (class 1 keeps up to 8 = class 0's lower bound) is not certified, whatever the class order
    np.testing.assert_array_equal(safe, margin > 0)
    assert not bool(robust.masking_margins(jnp.asarray(tie[..., ::-1]), 1, (2, 2))[0][0, 1])
    tie[:, 0, 1] = 1.5  # class 1 keeps at most 6 (3 with the border window): certified everywhere
    safe, margin = robust.masking_margins(jnp.asarray(tie), 0, (2, 2))
    np.testing.assert_array_equal(margin, [[5, 2, 2], [5, 3, 2], [5, 2, 2]])
    assert bool(safe.all())


def test_threshold_lower_bound_holds_against_an_attacker_who_adds_true_class_evidence():
    """With T > 0, adding true-class evidence can trigger a detection that masks genuine evidence.

    Class 0 keeps 9 outside the patch window {0, 1} and its zeroed map (best window 3 of 9) is below the
    detection threshold T = 0.5, so a bound that only masks when the zeroed map is detected (PatchGuard's code
    before its 12/2021 fix) gives 9 > 7.5, the most class 1 can reach. The attack below puts 5 of class-0
    evidence next to a genuine 3: detected, masked, class 0 drops to 6 and class 1 wins. bagjax's bound
    S0 - M0 = 6 does not certify this window.
    """
    grid = np.zeros((1, 7, 2), np.float32)
    grid[0, :, 0] = [1, 1, 3, 0, 3, 0, 3]
    grid[0, 2:, 1] = 0.75
    attacked = grid.copy()
    attacked[0, 0] = [0.0, 1.875]
    attacked[0, 1] = [5.0, 1.875]
    np.testing.assert_array_equal(robust.masked_logits(attacked, (1, 2), threshold=0.5), [6.0, 7.5])
    safe, margin = robust.masking_margins(jnp.asarray(grid), 0, (1, 2), threshold=0.5)
    assert float(margin[0, 0]) == 6.0 - 7.5 and not bool(safe[0, 0])

# PatchGuard fidelity (utils/defense_utils.py of inspire-group/PatchGuard): one hand grid per definition.
def test_patchguard_ties_go_to_the_largest_class_index_under_masking():
    """``masking_defense`` predicts ``np.argsort(kind='stable')[-1]``; ``clipping_defense`` ``np.argmax``."""
    tied = np.ones((2, 2, 3), np.float32)  # every class: 4 - 1 after masking a 1x1 window
    tied[..., 1] = 0.5
    masked = robust.masked_logits(jnp.asarray(tied), (1, 1))
    np.testing.assert_array_equal(masked, [3.0, 1.5, 3.0])
    assert int(robust.predicted_class(masked, "mask")) == 2 == robust_reference.masking_prediction(np.asarray(masked))
    assert int(robust.predicted_class(masked, "clip")) == 0 == int(np.argmax(np.asarray(masked)))
    out = robust.certify(jnp.asarray(tied)[None], jnp.asarray([2]), "mask", (1, 1))
    assert int(out["prediction"][0]) == 2 and not bool(out["certified"][0])  # a tie never certifies (rounding)


def test_patchguard_does_not_certify_an_image_whose_undefended_clipped_sum_is_wrong():
    """Class 1 has one strong location in the centre of a 3x3 grid, which every 2x2 window covers: masking
    removes it wherever the patch is, so the bound holds (margin 2 everywhere), but the undefended clipped sum
    (10 against 8) predicts class 1 and ``provable_masking`` returns 0 (incorrect clean prediction)."""
    grid = np.zeros((3, 3, 2), np.float32)
    grid[..., 0] = 1.0
    grid[1, 1] = [0.0, 10.0]
    safe, margin = robust.masking_margins(jnp.asarray(grid), 0, (2, 2))
    np.testing.assert_array_equal(margin, np.full((2, 2), 2.0))  # class 0 keeps 5 - 3, class 1 at most 0
    assert int(robust.predicted_class(robust.masked_logits(jnp.asarray(grid), (2, 2)), "mask")) == 0
    assert not bool(safe.any()) and not robust_reference.masking_certified(grid, 0, (2, 2))
    grid[1, 1, 1] = 7.0  # 7 < 8: the undefended sum is right, and the same bound certifies
    assert bool(robust.masking_margins(jnp.asarray(grid), 0, (2, 2))[0].all())


def test_patchguard_bound_without_detection_masks_only_a_window_overlapping_the_patch():
    """T = 0.5, patch window {0, 1} of a 1x8 grid: class 0's zeroed map [0, 0, 0, 3, 3, 3, 3, 3] has its largest
    window 6 <= T * 15, so nothing is detected; a patch in {0, 1} can only trigger a detection of a window that
    overlaps it ({0, 1} or {1, 2}, holding 0 genuine evidence), so class 0 keeps 15 (PatchGuard since 12/2021),
    not 15 - 6 = 9 (the largest window anywhere), and beats class 1's 6 / (1 - T) = 12."""
    grid = np.zeros((1, 8, 2), np.float32)
    grid[0, :, 0] = [3, 3, 0, 3, 3, 3, 3, 3]
    grid[0, 2:, 1] = 1.0
    safe, margin = robust.masking_margins(jnp.asarray(grid), 0, (1, 2), threshold=0.5)
    assert float(margin[0, 0]) == 15.0 - 12.0 and bool(safe[0, 0])
    # the certificate holds against every content of the window: true- and wrong-class evidence, any amount
    for values in itertools.product([0.0, 1.0, 3.0, 6.0, 20.0, 100.0], repeat=4):
        attacked = grid.copy()
        attacked[0, :2] = np.reshape(values, (2, 2))
        masked = robust_reference.masked_logits(attacked, (1, 2), threshold=0.5)
        assert robust_reference.masking_prediction(masked) == 0, values


# ----------------------------------------------------------------------------------------------- clipping
def test_parse_clip():
    cbn = robust.parse_clip("cbn")
    np.testing.assert_allclose(cbn.fn(jnp.asarray([0.0, 20.0])), np.tanh([-1.0, 0.0]), rtol=1e-6)
    assert (cbn.low, cbn.high) == (-1.0, 1.0)
    np.testing.assert_allclose(robust.parse_clip("cbn:1,0").fn(jnp.asarray(0.5)), np.tanh(0.5), rtol=1e-6)
    clamp = robust.parse_clip("clamp:0,2")
    np.testing.assert_array_equal(clamp.fn(jnp.asarray([-1.0, 1.0, 3.0])), [0.0, 1.0, 2.0])
    for bad in ("tanh", "clamp:1", "clamp:2,1", "cbn:a,b"):
        with pytest.raises(ValueError, match="unknown clip"):
            robust.parse_clip(bad)


def test_clipping_certificate_checks_every_class_not_just_the_runner_up():
    clip = robust.parse_clip("clamp:0,1")
    phi = np.zeros((1, 6, 3), np.float32)
    phi[..., 0] = 1.0
    phi[..., 1] = 0.75  # the runner-up (total 4.5): 5 x 0.25 - 1 = 0.25 > 0 at every window
    phi[0, :, 2] = [0.0, 0.125, 1, 1, 1, 1]  # total 4.125, but concentrated: at window 0 only 0.875 - 1 < 0
    safe, margin = robust.clipping_margins(jnp.asarray(phi), 0, (1, 1), clip)
    np.testing.assert_array_equal(safe, [[False, False, True, True, True, True]])
    assert float(margin[0, 0]) == -0.125 and float(margin[0, 1]) == 0.0  # window 1: an exact tie, not certified
    attacked = phi.copy()
    attacked[0, 0] = [0.0, 0.75, 1.0]  # the patch lowers class 0 and raises class 2 at location 0
    assert int(jnp.argmax(robust.clipped_logits(jnp.asarray(attacked), clip))) == 2
    runner_up_only = all(phi[..., 0].sum() - phi[..., 0][0, w] - (phi[..., 1].sum() - phi[..., 1][0, w]) > 1
                         for w in range(6))
    assert runner_up_only  # PatchGuard's provable_clipping (runner-up only) would have certified it


# ----------------------------------------------------------------------------------------------- agreement
def _signal_logits(key, batch, grid, classes):
    """Random logits whose label class gets a random boost: a mix of certified and attackable images."""
    k1, k2, k3 = jax.random.split(key, 3)
    logits = jax.random.normal(k1, (batch, *grid, classes))
    labels = jax.random.randint(k2, (batch,), 0, classes)
    boost = jax.random.uniform(k3, (batch, 1, 1)) * 3.0
    return logits + boost[..., None] * jax.nn.one_hot(labels, classes)[:, None, None], labels


@pytest.mark.parametrize("defense,kwargs", [("mask", {}), ("mask", {"threshold": 0.2, "clip_max": 2.0}),
                                            ("clip", {"clip": robust.parse_clip("cbn:1,0")})])
def test_certificates_equal_the_reference_loops(defense, kwargs):
    window = (3, 2)
    logits, labels = _signal_logits(jax.random.key(3), 40, (7, 6), 4)
    out = jax.jit(lambda p, y: robust.certify(p, y, defense, window, **kwargs))(logits, labels)
    logits, labels = np.asarray(logits), np.asarray(labels)
    if defense == "mask":
        expected = [robust_reference.masking_certified(p, y, window, kwargs.get("clip_max", np.inf),
                                                       kwargs.get("threshold", 0.0)) for p, y in zip(logits, labels)]
        predictions = [robust_reference.masking_prediction(robust_reference.masked_logits(
            p, window, kwargs.get("clip_max", np.inf), kwargs.get("threshold", 0.0))) for p in logits]
        np.testing.assert_array_equal(out["prediction"], predictions)
    else:
        clip = kwargs["clip"]
        expected = [robust_reference.clipping_certified(np.asarray(clip.fn(p)), y, window, clip.low, clip.high)
                    for p, y in zip(logits, labels)]
    np.testing.assert_array_equal(out["certified"], expected)
    assert 0 < sum(expected) < len(expected)  # both kinds of images occur
    assert np.all(out["prediction"][np.asarray(out["certified"])] == labels[np.asarray(out["certified"])])


@pytest.mark.parametrize("defense", ["mask", "clip"])
def test_no_logit_level_attack_breaks_a_certified_image(defense):
    """Overwrite every window of every certified grid with random and extreme values: the label still wins."""
    window = (2, 2)
    clip = robust.parse_clip("clamp:-1,1")
    kwargs = {"clip": clip} if defense == "clip" else {}
    logits, labels = _signal_logits(jax.random.key(5), 64, (6, 6), 3)
    cert = jax.jit(lambda x, y: robust.certify(x, y, defense, window, **kwargs))(logits, labels)
    assert 0 < int(cert["certified"].sum()) < 64
    rng = np.random.default_rng(0)
    masks = np.asarray(robust.window_masks((6, 6), window)).reshape(-1, 6, 6)
    predict = jax.jit(jax.vmap(lambda p: jnp.argmax(robust.defended_logits(p, defense, window, **kwargs))))
    broken_uncertified = 0
    for trial in range(24):
        scale = [0.5, 5.0, 1e6][trial % 3]
        values = rng.uniform(-scale, scale, logits.shape).astype(np.float32)
        values[..., :] = np.where(rng.random(logits.shape[:-1] + (1,)) < 0.3, -scale, values)  # extremes
        if defense == "clip":
            values = np.where(values > 0, 1.0, -1.0) * np.abs(values).clip(1.0)  # saturate the clip
        chosen = masks[rng.integers(len(masks), size=64)][..., None]
        attacked = jnp.where(chosen, values, logits)
        predicted = predict(attacked)
        broken = np.asarray(predicted != labels)
        assert not np.any(broken & np.asarray(cert["certified"]))
        broken_uncertified += int((broken & ~np.asarray(cert["certified"])).sum())
    assert broken_uncertified > 0  # the attacks are strong enough to break the others


# ----------------------------------------------------------------------------------------------- attack
def _with_class_bias(variables, cls, amount):
    """``variables`` with ``amount`` added to the head bias of class ``cls`` and taken from every other class's
    (every patch logit moves), so that bounded (clipped) evidence can certify too."""
    bias = jnp.asarray(variables["params"]["head"]["bias"])
    head = dict(variables["params"]["head"], bias=(bias - amount).at[cls].add(2 * amount))
    return {**variables, "params": {**variables["params"], "head": head}}


@pytest.mark.parametrize("defense,kwargs", [("mask", ()), ("clip", (("clip", robust.parse_clip("cbn:1,0")),))])
def test_pgd_patch_attack_never_breaks_a_certified_image(smoke, defense, kwargs):
    """On the demo smoke model, over many images and patch positions: a broken image was never certified, and
    no attack pushes any image's margin below the certificate's worst case over all windows.

    The two-step model barely separates its classes, so the certificate is taken for class 0 with the head's
    class-0 bias raised until about half of the images certify: both outcomes then occur on the same model.
    """
    from bagjax import data

    _, trained, _ = smoke
    model, size, p = trained.model, int(trained.config.image_size), 4
    batch = data.normalize(next(iter(data.eval_batches(trained.config, process_index=0, process_count=1)))["image"])
    images = jnp.concatenate([batch, batch[:, ::-1]])  # 16 images
    labels = jnp.zeros(len(images), jnp.int32)
    window = robust.window_shape(model, p, size, size)
    rf, stride = patches.receptive_field(model)

    certify = jax.jit(lambda logits: robust.certify(logits, labels, defense, window, **dict(kwargs)))

    def certified(amount):
        variables = _with_class_bias(trained.variables, 0, amount)
        return variables, certify(patch_robustness._patch_logits(model, variables, images))

    low, high = 0.0, 64.0
    for _ in range(10):  # bisect the bias to certify about half of the images
        mid = (low + high) / 2
        low, high = (mid, high) if float(certified(mid)[1]["certified"].mean()) < 0.5 else (low, mid)
    variables, cert = certified(high)
    is_certified = np.asarray(cert["certified"])
    assert 0 < is_certified.sum() < len(images)
    danger = attack.danger_origins(cert["margin"], 4, patch_px=p, rf=rf, stride=stride, image_size=size)
    grid = jnp.broadcast_to(jnp.asarray(attack.grid_origins(size, p, 4)), (len(images), 4, 2))
    origins = jnp.concatenate([danger, grid], axis=1)  # (B, 8, 2): the riskiest windows, the corners
    k, starts = origins.shape[1], 2
    entries = np.repeat(np.arange(len(images)), k * starts)
    out = attack.pgd_patch(model, variables, images[entries], labels[entries],
                           jnp.repeat(origins, starts, axis=1).reshape(-1, 2), jax.random.key(0), defense=defense,
                           window=window, patch_px=p, steps=8, step_size=0.1, defense_kwargs=kwargs)
    broken = np.asarray(out["broken"]).reshape(len(images), -1).any(axis=1)
    assert not np.any(broken & is_certified)
    # the certificate's margin is in summed evidence; clip's image logits are a mean over the grid
    scale = 1.0 if defense == "mask" else float(np.prod(patches.grid_shape(model, size, size)))
    worst_case = np.asarray(cert["margin"]).min(axis=(1, 2))[entries]
    assert np.all(-np.asarray(out["margin"]) * scale >= worst_case - 1e-3 * np.abs(worst_case).max())
    if defense == "mask":
        assert np.any(broken & ~is_certified)  # the attack does break images the certificate left open


# ----------------------------------------------------------------------------------------------- command
def test_patch_sizes_are_area_fractions_rounded_up_like_patchguard():
    # PatchGuard: 1%, 2% and 3% of a 224 px image are 23, 32 and 39 px patches
    assert patch_robustness.parse_patch_sizes("1%,2%, 3%,12px", 224) == [
        ("1%", 23), ("2%", 32), ("3%", 39), ("12px", 12)]
    for bad, match in (("0px", "a patch size is positive"), ("-4%", "a patch size is positive"),
                       ("101%", "does not fit"), ("4pct", "bad patch size"), ("", "at least"),
                       ("4", "'4' has no unit: write 4% .* or 4px"), ("inf%", "bad patch size"),
                       ("2.5px", "whole numbers"), ("4%,8%,4%", "lists 4% twice")):
        with pytest.raises(ValueError, match=match):
            patch_robustness.parse_patch_sizes(bad, 224)


@pytest.mark.parametrize("args,match", [
    (["--defense", ""], "give at least one --defense"), (["--defense", " , "], "give at least one --defense"),
    (["--defense", "mask,none,mask"], "lists mask twice"), (["--step-size", "-1"], r"--step-size .* \(0, 1\]"),
    (["--step-size", "nan"], "--step-size"), (["--clip-max", "-1"], "--clip-max .* must be positive"),
    (["--clip-max", "0"], "--clip-max"), (["--attack-examples", "-1"], "--attack-examples must be 0"),
    (["--steps", "0"], "--steps must be at least 1"), (["--max-examples", "0"], "--max-examples"),
    (["--threshold", "-0.5"], "threshold")])
def test_cli_checks_numbers_before_loading_anything(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):  # the workdir does not exist: checked before it is read
        patch_robustness.main(["--workdir", str(tmp_path / "missing"), *args])


def test_cli_writes_table_csv_and_figures(smoke, tmp_path, capsys):
    workdir, _, _ = smoke
    patch_robustness.main(["--workdir", str(workdir), "--out", str(tmp_path), "--patch-size", "1%",
                           "--defense", "mask,none", "--attack-examples", "2", "--steps", "1", "--starts", "1",
                           "--num-locations", "2", "--max-examples", "8"])
    markdown = (tmp_path / "robustness.md").read_text()
    assert markdown in capsys.readouterr().out and "8 eval images on a 6x6 logit grid" in markdown
    lines = (tmp_path / "robustness.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 and lines[1].startswith("mask,1%,7,")  # ceil(sqrt(0.01 * 64 * 64)) = 7 px
    assert lines[2].startswith("none,1%,7,") and lines[2].split(",")[8] == "0.0"  # none certifies nothing
    for name in ("robustness.png", "robustness_attack.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_cli_rejects_bad_input_in_one_line(smoke, tmp_path):
    workdir, _, _ = smoke
    with pytest.raises(FileNotFoundError, match="not a bagjax training workdir"):
        patch_robustness.main(["--workdir", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="does not fit the 64 px images"):
        patch_robustness.main(["--workdir", str(workdir), "--patch-size", "65px"])
    with pytest.raises(ValueError, match="bad patch size"):
        patch_robustness.main(["--workdir", str(workdir), "--patch-size", "big"])
    with pytest.raises(ValueError, match="unknown --defense 'median'"):
        patch_robustness.main(["--workdir", str(workdir), "--defense", "mask,median", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="threshold"):
        patch_robustness.main(["--workdir", str(workdir), "--threshold", "1"])
    resnet = tmp_path / "resnet"
    shutil.copytree(workdir, resnet)
    config = json.loads((resnet / "config.json").read_text())
    (resnet / "config.json").write_text(json.dumps({**config, "model": "resnet50"}))
    with pytest.raises(UserError, match="is not a BagNet"):
        patch_robustness.main(["--workdir", str(resnet)])
    assert not (workdir / "robustness").exists()  # nothing was written for bad input


def test_cli_output_and_dataset_errors_are_one_line_before_any_work(smoke, tmp_path):
    """An --out that is a file, and a dataset that is gone: one line, exit 1, before the certification runs."""
    workdir, _, _ = smoke
    afile, moved = file_and_moved_workdir(workdir, tmp_path, "tfds:no_such_dataset_here")
    for run, expected in (([str(workdir), "--out", str(afile)], f"{afile} is a file, not a directory"),
                          ([str(workdir), "--out", str(afile / "sub")], f"{afile} is a file, not a directory"),
                          ([str(moved)], f"this command takes the dataset from {moved / 'config.json'}: edit")):
        proc = subprocess.run([sys.executable, "-m", "bagjax.experiments.patch_robustness", "--workdir", *run],
                              cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and lines[-1].startswith("error: ") and expected in lines[-1], proc.stderr
        assert "Traceback" not in proc.stderr and "patch robustness" not in proc.stderr  # no tqdm bar: no work
    assert afile.read_text() == "keep me" and not (moved / "robustness").exists()


def test_clip_training_option_trains_on_clipped_bagnet_logits(smoke):
    """``config.robust.clip``: training and eval use the mean of the clipped patch logits (Clipped BagNet)."""
    from bagjax import data

    _, trained, metrics = smoke
    assert trained.config.robust.clip == "cbn:1,0"
    correct = count = 0
    for batch in data.eval_batches(trained.config, process_index=0, process_count=1):
        logits = patch_robustness._patch_logits(trained.model, trained.variables, jnp.asarray(data.normalize(batch["image"])))
        clipped = robust.clipped_logits(logits, robust.parse_clip("cbn:1,0"))
        assert float(jnp.abs(clipped).max()) <= 1.0
        correct += int(np.sum((np.argmax(clipped, -1) == batch["label"]) & batch["mask"]))
        count += int(batch["mask"].sum())
    assert count == metrics["eval_count"] and metrics["eval_accuracy"] == pytest.approx(correct / count)
    config = trained.config.copy_and_resolve_references()
    config.robust.clip = "tanh"
    with pytest.raises(ValueError, match="unknown clip"):
        robust.apply_model(trained.model, trained.variables, batch["image"], config)
