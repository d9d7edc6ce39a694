"""python -m bagjax.explore: the embedded data against the model, and the page itself in a real browser.

One smoke-trained BagNet workdir (train.py, which also writes its own explore.html) serves every test; under
pytest-xdist the first worker trains it and the others wait for it (a file lock). One headless Chromium
(Debian's ``chromium`` and ``chromium-driver``; .ci/run installs them) runs the browser checks.
"""

import base64
import dataclasses
import io
import json
import math
import pathlib
import shutil

import filelock
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bagjax import blackout, data, explore, robust
from bagjax.errors import UserError
from bagjax.workdir import load_trained
from test_anchornet import numpy_variables
from trainutil import run_train

CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def pages(tmp_path_factory, worker_id):
    """A smoke-trained BagNet workdir with train.py's explore.html and the split page of bagjax.explore."""
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    workdir = root / "explore-run"
    with filelock.FileLock(str(root / "explore-run.lock")):
        if not (workdir / "split.html").is_file():
            shutil.rmtree(workdir, ignore_errors=True)
            run_train("demo.py:smoke", workdir, "--config.heatmap_images=3")
            photo = root / "explore-photo.png"
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 50, 3), dtype=np.uint8)).save(photo)
            explore.explore(workdir, [str(photo)], out=workdir / "split.html", split="validation", max_examples=6,
                            stride=1, progress=False)
    return workdir


def page_data(path: pathlib.Path) -> dict:
    text = path.read_text()
    start = text.index('<script type="application/json" id="explore-data">') + len(
        '<script type="application/json" id="explore-data">')
    return json.loads(text[start:text.index("</script>", start)])


def pixels_of(record: dict) -> np.ndarray:
    """The embedded image's pixels (PNG below 128 px: lossless)."""
    assert record["image"].startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(record["image"].split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="session")
def model_outputs(pages):
    """The model's own float32 patch logits and predictions for every image of the split page."""
    trained = load_trained(pages)
    payload = page_data(pages / "split.html")
    images = jnp.asarray(np.stack([pixels_of(r) for r in payload["images"]]))
    normalized = data.normalize(images)
    patch_logits = np.asarray(trained.model.apply(trained.variables, normalized, train=False, method="patch_logits"))
    logits = np.asarray(trained.model.apply(trained.variables, normalized, train=False))
    return trained, payload, patch_logits, logits


def test_embedded_patch_logits_equal_the_model_within_the_stated_bound(pages, model_outputs):
    trained, payload, patch_logits, logits = model_outputs
    assert payload["kind"] == "bagnet" and payload["dataset"]["split"] == "validation"
    assert len(payload["dataset"]["labels"]) == 16 and len(payload["images"]) == 7  # 6 of the split and the photo
    names = [r["name"] for r in payload["images"]]
    assert names[-1].endswith("explore-photo.png") and names[0].startswith("validation #")
    first = payload["images"][:6]  # misclassified first, then by confidence
    wrong = [r["label"] != r["prediction"] for r in first]
    assert wrong == sorted(wrong, reverse=True)
    for k, record in enumerate(payload["images"]):
        encoded = record["maps"][0]["values"]
        values = explore.decode_array(encoded)
        assert record["classes"] == list(range(len(trained.class_names)))  # 4 classes: all embedded
        assert encoded["bound"] == pytest.approx(np.abs(patch_logits[k]).max() * 2**-11 + 2**-25, rel=1e-3)
        assert np.abs(values - patch_logits[k]).max() <= encoded["bound"]
        # the page's argmax (float64 mean of the decoded values) is bagjax's
        page_prediction = int(np.argmax(values.astype(np.float64).reshape(-1, values.shape[-1]).mean(0)))
        assert page_prediction == record["prediction"] == int(np.argmax(logits[k]))
        assert set(record["stride1"]) == {str(c) for c, *_ in record["top"][:3]}
    # train.py wrote the page of its heatmap images next to heatmaps.png
    trained_page = page_data(pages / "explore.html")
    assert len(trained_page["images"]) == 3 and (pages / "heatmaps.png").is_file()


def test_float16_falls_back_to_float32_where_a_near_tie_would_flip_the_argmax():
    tied = np.zeros((2, 2, 2), np.float32)
    tied[..., 0] = 1000.0
    tied[..., 1] = 1000.0 + 2**-10  # float16 rounds both to 1000: the page would predict class 0
    assert explore._mean_argmax(explore.encode_array(tied), np.arange(2)) == 0
    assert explore._mean_argmax(explore.encode_array(tied, "float32"), np.arange(2)) == 1
    winners = explore.possible_winners(np.array([[[5.0, 0.0, -1.0]], [[0.0, 4.0, -9.0]]], np.float32))
    assert winners.tolist() == [True, True, False]  # class 2 never beats the best worst-case of another
    rng = np.random.default_rng(0)
    many = rng.normal(size=(3, 3, 300)).astype(np.float32)
    many[..., 7] += 3.0  # the top class; most others can still win some single patch
    classes, cut = explore.embedded_classes(many.mean(axis=(0, 1)), many, 20)
    assert len(classes) == 20 and 7 in classes and cut and list(classes) == sorted(classes)
    ranked = np.argsort(-many.mean(axis=(0, 1)), kind="stable")
    assert set(ranked[:explore.TOP_K]) <= set(classes)  # the top-k always; the cut drops the lowest ranked


def test_bad_input_is_a_user_error_naming_the_fix(pages, tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        explore.explore(pages, ["x.png"], out=tmp_path)
    with pytest.raises(UserError, match="nothing to explore"):
        explore.explore(pages, [str(tmp_path / "missing.png")], out=tmp_path / "e.html", progress=False)
    assert not (tmp_path / "e.html").exists()


@pytest.fixture(scope="module")
def browser():
    if not pathlib.Path(CHROMEDRIVER).is_file():
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: apt-get install -y chromium "
                    "chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1400"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def open_page(browser, path: pathlib.Path) -> None:
    browser.get(path.as_uri())
    browser.get_log("performance")  # drop earlier pages' entries
    browser.get(path.as_uri())


def requests_and_errors(browser) -> tuple[set[str], list]:
    requests = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requests.add(message["params"]["request"]["url"])
    return requests, browser.get_log("browser")


def set_control(browser, element_id: str, value, event: str) -> None:
    browser.execute_script(f"const e = document.getElementById('{element_id}'); e.value = arguments[0]; "
                           f"e.dispatchEvent(new Event('{event}'));", str(value))


def attribute(browser, element_id: str, name: str) -> str:
    return browser.execute_script(f"return document.getElementById('{element_id}').dataset.{name};")


def test_the_page_in_a_browser(pages, model_outputs, browser, tmp_path):
    trained, payload, patch_logits, image_logits = model_outputs
    logits_of = np.argmax(image_logits, axis=-1)
    page = pages / "split.html"
    open_page(browser, page)
    requests, errors = requests_and_errors(browser)
    assert errors == []
    assert {u for u in requests if not u.startswith("data:")} == {page.as_uri()}

    # selecting another class changes the overlay
    before = browser.execute_script("return document.getElementById('overlay').toDataURL();")
    record = payload["images"][0]
    other = next(c for c in record["classes"] if c != record["prediction"])
    set_control(browser, "class-select", other, "change")
    selected = browser.execute_script("return document.getElementById('overlay').toDataURL();")
    assert selected != before
    set_control(browser, "blackout-fraction", 10, "input")
    browser.find_element("id", "show-kept").click()  # grey out the removed locations
    assert browser.execute_script("return document.getElementById('overlay').toDataURL();") != selected
    browser.find_element("id", "show-kept").click()

    # the blackout slider recomputes what bagjax computes for the same kept set
    rf, stride = trained.model.receptive_field, trained.model.stride
    for k in (0, 2, 6):
        browser.find_element("css selector", f"#gallery-items button[data-index='{k}']").click()
        logits = jnp.asarray(patch_logits[k])
        gh, gw, _ = logits.shape
        n = gh * gw
        scores = logits[..., payload["images"][k]["prediction"]].reshape(n)
        for policy in ("top", "random", "remove"):
            set_control(browser, "blackout-policy", policy, "change")
            for percent in (10, 30, 50, 90):
                set_control(browser, "blackout-fraction", percent, "input")
                kept = [int(v) for v in attribute(browser, "blackout-result", "kept").split(",")]
                mask = np.zeros(n, bool)
                mask[kept] = True
                if policy == "top":
                    expected = blackout.top_k_mask(scores, blackout.num_kept(percent / 100, n))
                    assert np.array_equal(mask, np.asarray(expected))
                if policy == "remove":
                    removed = blackout.top_k_mask(scores, min(n - 1, math.floor(percent / 100 * n + 0.5)))
                    assert np.array_equal(mask, ~np.asarray(removed))
                if policy == "random":
                    assert mask.sum() == blackout.num_kept(percent / 100, n)
                ours = blackout.kept_patch_logits(logits[None], jnp.asarray(mask.reshape(1, gh, gw)))
                assert int(attribute(browser, "blackout-result", "prediction")) == int(jnp.argmax(ours[0]))

        # the certified flag is bagjax.robust's, at every patch size
        height, width = pixels_of(payload["images"][k]).shape[:2]
        for index, size in enumerate(explore.patch_sizes(min(height, width))):
            set_control(browser, "patch-size", index, "change")
            window = robust.window_shape(trained.model, size, height, width)
            predicted = jnp.argmax(robust.defended_logits(logits, "mask", window))
            certified = bool(robust.certify(logits[None], predicted[None], "mask", window)["certified"][0])
            assert attribute(browser, "robust-result", "patch") == str(size)
            assert attribute(browser, "robust-result", "certified") == str(certified).lower()
            shown = browser.find_element("id", "robust-result").text
            assert shown.startswith("certified" if certified else "not certified") and f"{size} x {size} px" in shown
    assert rf > stride  # the boxes drawn are receptive fields, larger than the grid step

    # with every patch kept, the page's prediction is bagjax's on every embedded image
    set_control(browser, "blackout-policy", "top", "change")
    set_control(browser, "blackout-fraction", 100, "input")
    for k, record in enumerate(payload["images"]):
        browser.find_element("css selector", f"#gallery-items button[data-index='{k}']").click()
        assert int(attribute(browser, "blackout-result", "prediction")) == record["prediction"] == int(logits_of[k])

    # a confusion-matrix cell filters the gallery to its embedded images
    cell = browser.find_element("css selector", "#confusion td.cell[data-true][data-pred]:not(:empty)")
    truth, predicted = int(cell.get_attribute("data-true")), int(cell.get_attribute("data-pred"))
    cell.click()
    shown = browser.find_elements("css selector", "#gallery-items button")
    assert len(shown) == sum(r["label"] == truth and r["prediction"] == predicted for r in payload["images"])

    # hovering shows a location's patch box and top classes
    browser.execute_script("document.getElementById('boxes').dispatchEvent(new MouseEvent('mousemove', "
                           "{clientX: document.getElementById('boxes').getBoundingClientRect().left + 5, "
                           "clientY: document.getElementById('boxes').getBoundingClientRect().top + 5}));")
    assert attribute(browser, "patch-info", "location") == "0,0"

    shot = tmp_path / "explore.png"
    browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # not blank
    _, errors = requests_and_errors(browser)
    assert errors == []


@pytest.mark.parametrize("model", ["resnet50", "anchornet"])
def test_resnet_cams_and_anchornet_branches_open_in_the_browser(model, browser, tmp_path):
    from bagjax.models import build_model
    from bagjax.workdir import Trained
    from configs import default

    config = default.get_config("smoke")
    config.model = model
    if model == "anchornet":
        config.image_size = 112
        config.model_kwargs = {}
    trained_model = build_model(config, 4)
    size = config.image_size
    variables = numpy_variables(trained_model, jnp.zeros((1, size, size, 3)))
    trained = Trained(config, trained_model, variables, ("a", "b", "c", "d"))
    rng = np.random.default_rng(1)
    examples = [explore.Example(f"img {i}", rng.integers(0, 255, (size, size, 3), dtype=np.uint8), i % 4)
                for i in range(2)]
    out = explore.explore(tmp_path, examples=examples, trained=trained, out=tmp_path / "page.html", progress=False)
    payload = page_data(out)
    record = payload["images"][0]
    if model == "anchornet":
        assert payload["kind"] == "anchornet" and [m["name"] for m in record["maps"]] == [
            "branch 63", "branch 95", "branch 111"]
        assert record["rule"]["patch"] in (63, 95, 111) and record["rule"]["boxes"]
    else:
        assert payload["kind"] == "cam" and record["maps"][0]["name"] == "CAM"
        cam = explore.decode_array(record["maps"][0]["values"])
        # CAM: the head at every location; its mean is the image logits (a linear head)
        np.testing.assert_allclose(cam.mean(axis=(0, 1)), [t[2] for t in sorted(record["top"])], atol=1e-2)
    open_page(browser, out)
    requests, errors = requests_and_errors(browser)
    assert errors == [] and {u for u in requests if not u.startswith("data:")} == {out.as_uri()}
    assert browser.execute_script("return document.getElementById('bagnet-panels').hidden;")


def test_a_clipped_bagnet_embeds_its_clipped_evidence(pages, model_outputs, tmp_path):
    """With config.robust.clip the image logits are the mean of phi(patch logits): the page must average phi."""
    trained, payload, patch_logits, _ = model_outputs
    config = trained.config.copy_and_resolve_references()
    config.robust.clip = "cbn"
    clipped = dataclasses.replace(trained, config=config)
    examples = [explore.Example("a", pixels_of(payload["images"][0]))]
    record = page_data(explore.explore(pages, examples=examples, trained=clipped, out=tmp_path / "c.html",
                                       progress=False))["images"][0]
    phi = np.tanh(0.05 * patch_logits[0] - 1.0)
    assert np.abs(explore.decode_array(record["maps"][0]["values"]) - phi).max() <= record["maps"][0]["values"]["bound"]
    assert record["prediction"] == int(np.argmax(phi.mean(axis=(0, 1))))
