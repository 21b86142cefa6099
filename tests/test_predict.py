"""The predict command on the shared trained alexnet2012 (tests/conftest.py: trained_run): images of any
size, every file answered in order with an exit status that says whether any failed, a missing model.pt
named as such."""

from __future__ import annotations

import pytest
from PIL import Image

from pipeline.drivers.predict import from_weights
from tests.conftest import run_predict


def weights_arguments(trained_run, digits_tree) -> list[str]:
    return ["--model", str(trained_run["out"] / "model.pt"), "--name", "alexnet2012", "--params",
            str(trained_run["folder"] / "params.yaml"), "--data", str(digits_tree / "beton")]


def blocks(stdout: str) -> dict[str, list[str]]:
    """predict's output, a file's name then its indented lines, by file name (in order)."""
    found: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("  "):
            found[next(reversed(found))].append(line.strip())
        else:
            found[line] = []
    return found


@pytest.mark.slow
def test_every_file_gets_its_lines_and_the_exit_status_counts_the_failures(trained_run, digits_tree, tmp_path):
    digit = next((digits_tree / "prepared" / "images" / "val" / "digit_4").iterdir())
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 90)).save(tiny)
    note, missing = tmp_path / "note.jpg", tmp_path / "missing.png"
    note.write_text("not an image")
    result = run_predict(*weights_arguments(trained_run, digits_tree), str(note), str(digit), str(missing), str(tiny))
    assert result.returncode == 1, result.stderr
    answered = blocks(result.stdout)
    assert list(answered) == [str(note), str(digit), str(missing), str(tiny)], "the order given"
    assert answered[str(note)] == ["not predicted: not an image (no known image format)"]
    assert answered[str(missing)][0].startswith("not predicted: cannot be read")
    for image in (digit, tiny):
        assert [line.split()[0] for line in answered[str(image)]] == ["1", "2", "3", "4", "5"]
        assert all(line.split()[1].startswith("digit_") for line in answered[str(image)])
    assert result.stderr.strip() == f"error: 2 of 4 files could not be read as images: {note}, {missing}", \
        "one line, no traceback"

    all_good = run_predict(*weights_arguments(trained_run, digits_tree), str(digit), str(tiny))
    assert all_good.returncode == 0 and all_good.stderr == "" and list(blocks(all_good.stdout)) == [str(digit), str(tiny)]


@pytest.mark.slow
def test_a_one_pixel_image_is_enlarged_like_any_other(trained_run, digits_tree, tmp_path):
    """Enlarged, one pixel is a flat square: it must predict what a large flat image of its colour does."""
    predictor = from_weights(trained_run["out"] / "model.pt", trained_run["folder"] / "params.yaml",
                             digits_tree / "beton", "alexnet2012")
    paths = []
    for side in (1, 2, 300):
        paths.append(tmp_path / f"flat-{side}.png")
        Image.new("RGB", (side, side), (40, 180, 220)).save(paths[-1])
    one, two, large = predictor.top_classes(paths)
    assert [name for name, _ in one] == [name for name, _ in two] == [name for name, _ in large]
    assert [p for _, p in one] == pytest.approx([p for _, p in large], rel=1e-5)


@pytest.mark.slow
def test_a_missing_model_file_is_named_as_missing(trained_run, digits_tree, tmp_path):
    digit = next((digits_tree / "prepared" / "images" / "val" / "digit_4").iterdir())
    arguments = weights_arguments(trained_run, digits_tree)
    arguments[1] = str(tmp_path / "outputs" / "train" / "vgg11_bn" / "model.pt")
    result = run_predict(*arguments, str(digit))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: --model {arguments[1]}: no such file (a train stage's "
                                                  "model.pt, e.g. outputs/train/vgg11_bn/model.pt, or an MLflow model "
                                                  "URI such as models:/best-model@best)"]
