"""Text-to-image search: index mechanics against brute force, resume, bad files, CLI, half precision."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import clipmoe
from clipmoe import cli, sparse_upcycle
from clipmoe.apps import search
from clipmoe.apps.search import ImageIndex, build_index, list_images
from conftest import make_tiny_clip

QUERY = "a red cube on the left"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A dense tiny CLIP and a MoE upcycled from it (routers randomised so routing matters), on disk."""
    root = tmp_path_factory.mktemp("models")
    dense = make_tiny_clip()
    dense.save_pretrained(root / "dense")
    moe = sparse_upcycle(dense, 4, top_k=2, noise=0.1)
    torch.manual_seed(2)
    for m in moe.moe_layers():
        torch.nn.init.normal_(m.router.weight)
    moe.save_pretrained(root / "moe")
    return {"dense": str(root / "dense"), "moe": str(root / "moe")}


@pytest.fixture
def images(tmp_path):
    """14 random images in nested folders, plus files the indexer must skip or ignore."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(14):
        folder = root / ("sub" if i % 3 == 0 else "") / ("deeper" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (int(rng.integers(24, 64)), int(rng.integers(24, 64)), 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    (root / "broken.jpg").write_bytes(b"not an image at all")
    png = (root / "img01.png").read_bytes()
    (root / "sub" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "captions.txt").write_text("a caption file is not an image")
    (root / ".cache").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".cache" / "thumb.png")
    return str(root)


def brute_force(model_dir, images_dir, paths, query):
    """Cosine similarity of every image with the query, computed directly with the model."""
    model = clipmoe.load(model_dir)
    with torch.no_grad():
        pixels = []
        for p in paths:
            with Image.open(os.path.join(images_dir, p)) as im:
                pixels.append(model.image_processor(im))
        img = torch.nn.functional.normalize(model.encode_image(torch.stack(pixels)), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(**model.tokenizer([query])), dim=-1)
    return (img @ txt[0]).numpy()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_search_matches_brute_force(models, images, tmp_path, kind):
    report = build_index(images, models[kind], tmp_path / "index", batch_size=4, chunk_size=5, progress=False)
    good = [p for p in list_images(images) if "broken" not in p and "truncated" not in p]
    assert report.indexed == report.embedded == len(good) == 14
    assert sorted(p for p, _ in report.skipped) == ["broken.jpg", os.path.join("sub", "truncated.png")]

    index = ImageIndex(tmp_path / "index")
    hits = index.search(QUERY, top_k=5)[0]
    scores = brute_force(models[kind], images, index.relative_paths, QUERY)
    order = np.argsort(-scores)[:5]
    assert [h.path for h in hits] == [os.path.join(images, index.relative_paths[i]) for i in order]
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
    assert not os.path.exists(tmp_path / "index" / "partial")
    skipped_log = (tmp_path / "index" / "skipped.log").read_text().splitlines()
    assert len(skipped_log) == 2 and skipped_log[0].startswith("broken.jpg\t")
    assert ".cache" not in " ".join(index.relative_paths)  # hidden folders are not walked


def test_index_resumes_after_interruption(models, images, tmp_path, monkeypatch):
    out = tmp_path / "index"
    real_embed = search._embed_files
    calls = []

    class Killed(Exception):
        pass

    def crash_on_third_chunk(model, images_dir, files, *args):
        calls.append(list(files))
        if len(calls) == 3 and crash:
            raise Killed
        return real_embed(model, images_dir, files, *args)

    monkeypatch.setattr(search, "_embed_files", crash_on_third_chunk)
    crash = True
    with pytest.raises(Killed):
        build_index(images, models["moe"], out, batch_size=2, chunk_size=4, progress=False)
    saved = sorted(os.listdir(out / "partial"))
    assert saved == ["chunk-000000.npz", "chunk-000001.npz", "manifest.json"]
    with pytest.raises(FileNotFoundError, match="unfinished run"):
        ImageIndex(out)

    done_before = sum(len(np.load(out / "partial" / c)["paths"]) for c in saved if c.endswith(".npz"))
    assert done_before == len({f for c in calls[:2] for f in c} - {"broken.jpg"})  # bad files are not saved

    calls.clear()
    crash = False
    report = build_index(images, models["moe"], out, batch_size=2, chunk_size=4, progress=False)
    assert sum(len(c) for c in calls) == 16 - done_before  # 14 images + 2 bad files, minus those saved
    assert report.embedded == 14 - done_before and report.indexed == 14
    assert len(report.skipped) == 2

    fresh = build_index(images, models["moe"], tmp_path / "fresh", batch_size=16, progress=False)
    assert fresh.indexed == 14
    a, b = ImageIndex(out), ImageIndex(tmp_path / "fresh")
    assert a.relative_paths == b.relative_paths
    np.testing.assert_allclose(a.index.reconstruct_n(0, 14), b.index.reconstruct_n(0, 14), atol=1e-6)


def test_rerun_is_incremental(models, images, tmp_path, monkeypatch):
    out = tmp_path / "index"
    build_index(images, models["dense"], out, progress=False)
    os.remove(os.path.join(images, "broken.jpg"))
    os.remove(os.path.join(images, "sub", "truncated.png"))
    assert build_index(images, models["dense"], out, progress=False).embedded == 0
    assert (out / "skipped.log").read_text() == ""  # the bad files are gone, and so is their record
    mtime = os.path.getmtime(out / "index.faiss")
    assert build_index(images, models["dense"], out, progress=False).embedded == 0
    assert os.path.getmtime(out / "index.faiss") == mtime  # up to date: left untouched
    assert not (out / "partial").exists()

    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(os.path.join(images, "new.png"))
    os.remove(os.path.join(images, "img02.jpg"))
    report = build_index(images, models["dense"], out, progress=False)
    assert (report.embedded, report.indexed) == (1, 14)
    paths = ImageIndex(out).relative_paths
    assert "new.png" in paths and "img02.jpg" not in paths


def test_index_refuses_another_model_and_foreign_folders(models, images, tmp_path):
    build_index(images, models["dense"], tmp_path / "index", progress=False)
    with pytest.raises(ValueError, match="was built with model .*dense.*their features cannot share an index"):
        build_index(images, models["moe"], tmp_path / "index", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a clipmoe image index"):
        build_index(images, models["dense"], tmp_path / "other", progress=False)
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        build_index(tmp_path / "missing", models["dense"], tmp_path / "index2", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        build_index(tmp_path / "empty", models["dense"], tmp_path / "index3", progress=False)
    (tmp_path / "empty" / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"none of the 1 image files .* could be read \(bad.png: "):
        build_index(tmp_path / "empty", models["dense"], tmp_path / "index3", progress=False)


def test_cli_index_and_search(models, images, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "index")
    assert cli.main(["index", images, "--model", models["moe"], "--out", out, "--chunk-size", "6"]) == 0
    printed = capsys.readouterr().out
    assert "indexed 14 images (14 embedded by this run)" in printed
    assert "skipped 2 unreadable files (broken.jpg, sub/truncated.png)" in printed

    assert cli.main(["search", out, QUERY, "--top-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = ImageIndex(out).search(QUERY, top_k=3)[0]
    assert result["query"] == QUERY
    assert [(r["rank"], r["path"]) for r in result["results"]] == [(i + 1, h.path) for i, h in enumerate(expected)]
    assert cli.main(["search", out, QUERY, "--top-k", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 14 and lines[0].split("\t")[1] == expected[0].path

    assert cli.main(["search", str(tmp_path / "nope"), QUERY]) == 2
    assert "holds no finished clipmoe image index" in capsys.readouterr().err


def test_bfloat16_on_cpu_keeps_routers_fp32(models, images, tmp_path):
    fp32 = clipmoe.load(models["moe"])
    bf16 = clipmoe.load(models["moe"], dtype=torch.bfloat16)
    assert {m.router.weight.dtype for m in bf16.moe_layers()} == {torch.float32}
    assert {m.w1.dtype for m in bf16.moe_layers()} == {torch.bfloat16}
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = fp32.encode_image(pixels)
        got = bf16.encode_image(pixels.bfloat16())
        tokens = torch.randn(5, 32)
        mlp_ref = fp32.moe_layers("vision")[0](tokens)
        mlp_got = bf16.moe_layers("vision")[0](tokens.bfloat16())
    assert got.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(got.float(), ref).min() > 0.99
    torch.testing.assert_close(mlp_got.float(), mlp_ref, atol=0.05, rtol=0.05)

    build_index(images, models["moe"], tmp_path / "bf16", dtype="bfloat16", progress=False)
    index = ImageIndex(tmp_path / "bf16")
    assert index.meta["dtype"] == "bfloat16"
    hits = index.search(QUERY, top_k=14)[0]  # the text side defaults to the index's dtype
    scores = brute_force(models["moe"], images, index.relative_paths, QUERY)
    np.testing.assert_allclose(sorted(h.score for h in hits), sorted(scores), atol=0.05)
