"""``evaluate_suite`` on a world-style eval/ folder, and ``clipmoe eval`` end to end (results and errors)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

import clipmoe
from clipmoe.cli import main
from clipmoe.eval import encode_images, evaluate_classification, evaluate_retrieval, evaluate_suite, load_wds
from conftest import make_tiny_clip
from test_eval_data import noise_image, write_wds_classification, write_wds_retrieval
from test_eval_mmvp import write_mmvp, write_probes

COLORS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    """The generated world's eval/ layout: wds retrieval and classification, mmvp/, probes/."""
    root = tmp_path_factory.mktemp("world") / "eval"
    images = [noise_image(i) for i in range(12)]
    write_wds_retrieval(root / "retrieval_short", images, [[f"a {COLORS[i % 3]} cube", "a photo"] for i in range(12)])
    labels = [i % 3 for i in range(12)]
    write_wds_classification(root / "cls_color", images, labels, COLORS, ["a {c} object", "a photo of {c}"])
    write_mmvp(root / "mmvp", "MLLM_VLM Images")
    write_probes(root / "probes")
    (root / "notes").mkdir()  # anything else is ignored
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dense = make_tiny_clip()
    dense.save_pretrained(root / "dense")
    clipmoe.sparse_upcycle(dense, num_experts=4, top_k=2, layers=1, noise=0.1).save_pretrained(root / "moe")
    return {"dense": str(root / "dense"), "moe": str(root / "moe")}


def test_suite_runs_everything_and_routing_for_moe(eval_dir, model_dirs):
    results = evaluate_suite(clipmoe.load(model_dirs["moe"]), eval_dir, batch_size=5)
    for key in (
        "retrieval_short/image_to_text_R@10",
        "cls_color/top1",
        "mmvp/mean",
        "probes/pair_mean",
        "probes/swap/count",
    ):
        assert key in results
    assert results["retrieval_short/num_texts"] == 24 and results["cls_color/num_classes"] == 3
    assert not any(k.startswith("notes/") for k in results)
    routing = results["routing"]
    assert routing["image"]["layers"] == routing["text"]["layers"] == [1]  # layers=1: the last block
    assert set(routing["image"]["groups"]) == {"color", "mmvp_pattern", "probe_attribute"}
    assert routing["image"]["groups"]["color"]["tokens"] == [4 * 17] * 3
    json.dumps(results, allow_nan=False)  # JSON-able as is

    dense = evaluate_suite(clipmoe.load(model_dirs["dense"]), eval_dir, batch_size=5)
    assert "routing" not in dense and set(dense) == set(results) - {"routing"}


def test_sets_that_share_their_images_encode_them_once_with_the_same_results(model_dirs, tmp_path):
    """A world writes its evaluation images into every set: the suite encodes each distinct image list once,
    and every metric equals the set evaluated on its own (the plain path); routing counts each image once."""
    root = tmp_path / "eval"
    images = [noise_image(i) for i in range(12)]
    write_wds_classification(root / "cls_color", images, [i % 3 for i in range(12)], COLORS, ["a {c} object"])
    write_wds_classification(root / "cls_size", images, [i % 2 for i in range(12)], ["small", "large"], ["a {c} one"])
    write_wds_retrieval(root / "retrieval_short", images, [[f"a {COLORS[i % 3]} cube"] for i in range(12)])  # png
    model = clipmoe.load(model_dirs["moe"])
    results = evaluate_suite(model, root, batch_size=5)
    for name in ("cls_color", "cls_size", "retrieval_short"):
        data = load_wds(root / name)
        alone = (evaluate_retrieval if name.startswith("retrieval") else evaluate_classification)(
            model, data, batch_size=5
        )
        assert {k: results[f"{name}/{k}"] for k in alone} == alone, name
    data = load_wds(root / "cls_color")
    features = encode_images(model, data.images, batch_size=5)
    with pytest.raises(ValueError, match=r"image_hook runs while images are encoded; with image_features none are"):
        evaluate_classification(model, data, image_features=features, image_hook=lambda *_: None)
    with pytest.raises(ValueError, match=r"11 image features for 12 images"):
        evaluate_classification(model, data, image_features=features[:11])
    image = results["routing"]["image"]
    assert image["tokens"] == 17 * (12 + 12)  # the classification sets' webp images once, the retrieval's png once
    assert image["groups"]["color"]["tokens"] == [4 * 17] * 3 and image["groups"]["size"]["tokens"] == [6 * 17] * 2


def test_cli_retrieval_writes_json_and_prints_a_table(eval_dir, model_dirs, tmp_path, capsys):
    out = tmp_path / "res" / "retrieval.json"
    data = str(eval_dir / "retrieval_short")
    assert (
        main(
            ["eval", model_dirs["dense"], "--task", "retrieval", "--data", data, "--out", str(out), "--batch-size", "4"]
        )
        == 0
    )
    written = json.loads(out.read_text())
    assert written == pytest.approx(evaluate_retrieval(clipmoe.load(model_dirs["dense"]), load_wds(data)))
    table = capsys.readouterr().out
    assert "text_to_image_R@5" in table and f"{written['text_to_image_R@5']:.2f}" in table


def test_cli_suite_with_routing_plot(eval_dir, model_dirs, tmp_path, capsys):
    out, png = tmp_path / "suite.json", tmp_path / "routing.png"
    argv = [
        "eval",
        model_dirs["moe"],
        "--task",
        "suite",
        "--data",
        str(eval_dir),
        "--out",
        str(out),
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    assert "routing" in json.loads(out.read_text())
    for tower in ("vision", "text"):  # one figure per tower
        with Image.open(tmp_path / f"routing_{tower}.png") as im:
            assert im.format == "PNG"
    printed = capsys.readouterr().out
    assert "routing image block 1" in printed and str(tmp_path / "routing_vision.png") in printed


def test_cli_routing_on_a_classification_dataset_groups_by_class(eval_dir, model_dirs, tmp_path):
    out = tmp_path / "routing.json"
    argv = ["eval", model_dirs["moe"], "--task", "routing", "--data", str(eval_dir / "cls_color"), "--out", str(out)]
    assert main(argv) == 0
    routing = json.loads(out.read_text())
    assert routing["image"]["groups"]["class"]["names"] == sorted(COLORS)
    tokenizer = clipmoe.load(model_dirs["moe"]).tokenizer
    prompt_tokens = [
        int(tokenizer([f"a {c} object", f"a photo of {c}"])["attention_mask"].sum()) for c in sorted(COLORS)
    ]
    assert routing["text"]["groups"]["class"]["tokens"] == prompt_tokens


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cli_bad_input_gives_one_clear_error(eval_dir, model_dirs, tmp_path, capsys):
    model = model_dirs["dense"]
    assert "no data at" in _error(["eval", model, "--task", "retrieval", "--data", str(tmp_path / "nope")], capsys)

    folder = tmp_path / "imagefolder"
    os.makedirs(folder / "cat")
    os.makedirs(folder / "dog")
    noise_image(0).save(folder / "cat" / "0.png")
    assert "class 'dog' has no images" in _error(
        ["eval", model, "--task", "classification", "--data", str(folder)], capsys
    )

    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "missing.jpg"}], "annotations": []}))
    assert "missing.jpg" in _error(["eval", model, "--task", "retrieval", "--data", str(coco)], capsys)

    empty = write_wds_retrieval(tmp_path / "empty", [], [], shards=1)
    assert "the split is empty" in _error(["eval", model, "--task", "retrieval", "--data", empty], capsys)

    wrong = ["eval", model, "--task", "classification", "--data", str(eval_dir / "retrieval_short")]
    assert "is a retrieval dataset; use --task retrieval" in _error(wrong, capsys)
    assert "no MoE layers" in _error(["eval", model, "--task", "routing", "--data", str(eval_dir)], capsys)

    not_a_world = ["eval", model, "--task", "attributes", "--data", str(eval_dir)]
    assert f"{eval_dir}: not a generated world (no world.json;" in _error(not_a_world, capsys)
    probe_elsewhere = ["eval", model, "--task", "retrieval", "--data", str(eval_dir / "retrieval_short")]
    assert "--probe-world is for --task attributes" in _error(
        [*probe_elsewhere, "--probe-world", str(eval_dir)], capsys
    )
    suite_as_one = ["eval", model, "--task", "classification", "--data", str(eval_dir)]  # not an ImageFolder
    assert f"{eval_dir} holds evaluation sets (cls_color, retrieval_short): give one of them" in _error(
        suite_as_one, capsys
    )
    (eval_dir.parent / "world.json").write_text("{}")  # a world's folder: train/ and eval/ are not two classes
    try:
        world_as_one = ["eval", model, "--task", "classification", "--data", str(eval_dir.parent)]
        assert "is a generated world, not one evaluation set" in _error(world_as_one, capsys)
    finally:
        (eval_dir.parent / "world.json").unlink()


def test_eval_refuses_an_out_it_cannot_write_and_options_a_task_ignores_before_loading_the_model(tmp_path, capsys):
    """Nothing is computed for a result that cannot be written, and no option is taken and ignored; the model
    path is never opened (the checks come first)."""
    nowhere = str(tmp_path / "no-model")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    world = tmp_path / "world"
    from clipmoe.data.world import WorldConfig, generate_world

    generate_world(world, WorldConfig.preset("test", train_size=4, eval_size=8), verbose=False)
    argv = ["eval", nowhere, "--task", "attributes", "--data", str(world)]
    out_under_a_file = _error([*argv, "--out", str(tmp_path / "a-file" / "r.json")], capsys)
    assert f"{tmp_path / 'a-file'} is a file, not a folder" in out_under_a_file
    assert "is a folder; give a file path" in _error([*argv, "--out", str(tmp_path / "a-folder")], capsys)
    assert "--split, --num-workers: not used by --task attributes" in _error(
        [*argv, "--split", "train", "--num-workers", "2"], capsys
    )
    assert "--probe-train-size: need --probe-world" in _error([*argv, "--probe-train-size", "7"], capsys)
    assert "--probe-test-size must be positive, got -3" in _error(
        [*argv, "--probe-world", str(world), "--probe-test-size", "-3"], capsys
    )
    retrieval = ["eval", nowhere, "--task", "retrieval", "--data", str(world / "eval" / "retrieval_short")]
    assert "--probe-test-size: for --task attributes" in _error([*retrieval, "--probe-test-size", "3"], capsys)


def test_attributes_refuses_worlds_it_cannot_read_right_before_loading_the_model(tmp_path, capsys):
    from clipmoe.data.world import WorldConfig, generate_world

    small, larger_dots = tmp_path / "small", tmp_path / "larger-dots"
    generate_world(small, WorldConfig.preset("test", train_size=4, eval_size=8), verbose=False)
    generate_world(larger_dots, WorldConfig.preset("test", train_size=4, eval_size=8, dot_radius=0.09), verbose=False)
    nowhere = str(tmp_path / "no-model")  # never opened: the worlds are checked first
    argv = ["eval", nowhere, "--task", "attributes", "--data", str(small), "--probe-world"]
    assert "draw their images differently (dot_radius 0.045 vs 0.09)" in _error([*argv, str(larger_dots)], capsys)
    object_dots = tmp_path / "object-dots"
    generate_world(
        object_dots, WorldConfig.preset("test", train_size=4, eval_size=8, dot_color="object"), verbose=False
    )
    assert "draw their images differently (dot_color contrast vs object)" in _error([*argv, str(object_dots)], capsys)
    spots = tmp_path / "spots"
    generate_world(spots, WorldConfig.preset("test", train_size=4, eval_size=8, dot_placement="object"), verbose=False)
    assert "draw their images differently (dot_placement apart vs object)" in _error([*argv, str(spots)], capsys)
    too_few = _error([*argv, str(small)], capsys)
    assert f"{small}: 8 evaluation images, the probes need 5000 + 1000 (--probe-train-size" in too_few
