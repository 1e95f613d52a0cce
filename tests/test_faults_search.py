"""`clipmoe index` / `search` against hostile folders and files (issue #17 items 5, 6 and 8)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import clipmoe
from clipmoe import cli
from clipmoe.apps import search
from clipmoe.apps.search import ImageIndex, build_index
from conftest import make_tiny_clip
from test_faults_io import in_child_with_file_size_limit

QUERY = "a red cube on the left"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "dense"
    make_tiny_clip().save_pretrained(path)
    return str(path)


def noise(seed: int, w: int = 40, h: int = 30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    noise(0).save(root / "a.png")
    noise(1).save(root / "b.bmp")  # uncompressed: a new picture of the same size has the same byte size
    noise(2).save(root / "c.jpg")
    return root


def features_of(model_dir: str, path) -> np.ndarray:
    model = clipmoe.load(model_dir)
    with Image.open(path) as image, torch.no_grad():
        x = model.encode_image(model.image_processor(image)[None])
    return torch.nn.functional.normalize(x, dim=-1)[0].numpy()


def row(index: ImageIndex, rel: str) -> np.ndarray:
    return index.index.reconstruct(index.relative_paths.index(rel))


def test_index_reembeds_images_whose_size_or_mtime_changed(model_dir, images, tmp_path):
    out = tmp_path / "index"
    assert build_index(images, model_dir, out, progress=False).embedded == 3
    before = ImageIndex(out)
    a_stat, b_stat = os.stat(images / "a.png"), os.stat(images / "b.bmp")
    noise(10, 50, 30).save(images / "a.png")  # other size, same mtime
    os.utime(images / "a.png", ns=(a_stat.st_atime_ns, a_stat.st_mtime_ns))
    noise(11).save(images / "b.bmp")  # same size, later mtime
    os.utime(images / "b.bmp", ns=(b_stat.st_atime_ns, b_stat.st_mtime_ns + 10**9))
    assert os.path.getsize(images / "b.bmp") == b_stat.st_size
    report = build_index(images, model_dir, out, progress=False)
    assert (report.embedded, report.indexed) == (2, 3)
    after = ImageIndex(out)
    for rel in ("a.png", "b.bmp"):
        np.testing.assert_allclose(row(after, rel), features_of(model_dir, images / rel), atol=1e-5)
        assert not np.allclose(row(after, rel), row(before, rel), atol=1e-3)
    np.testing.assert_array_equal(row(after, "c.jpg"), row(before, "c.jpg"))
    assert build_index(images, model_dir, out, progress=False).embedded == 0  # and then it is up to date


def test_changed_image_in_an_unfinished_run_is_not_lost_on_resume(model_dir, images, tmp_path, monkeypatch):
    """A re-embedded image saved only in a partial chunk must still replace the finished index's feature."""
    out = tmp_path / "index"
    build_index(images, model_dir, out, progress=False)
    noise(20, 60, 30).save(images / "a.png")
    monkeypatch.setattr(search, "_write_index", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after the chunk was saved, before the index was swapped
        build_index(images, model_dir, out, progress=False)
    monkeypatch.undo()
    assert build_index(images, model_dir, out, progress=False).embedded == 0
    np.testing.assert_allclose(row(ImageIndex(out), "a.png"), features_of(model_dir, images / "a.png"), atol=1e-5)


@pytest.mark.timeout(60, method="thread")  # the old indexer blocked forever opening the FIFO
def test_fifo_named_png_is_skipped_not_opened(model_dir, images, tmp_path):
    os.mkfifo(images / "x.png")
    report = build_index(images, model_dir, tmp_path / "index", progress=False)
    assert report.indexed == 3 and report.skipped == [("x.png", "not a regular file (FIFO)")]
    assert (tmp_path / "index" / "skipped.log").read_text() == "x.png\tnot a regular file (FIFO)\n"


def test_extreme_aspect_image_is_skipped_by_the_indexer(model_dir, images, tmp_path):
    Image.new("RGB", (1, 4000)).save(images / "strip.png")
    report = build_index(images, model_dir, tmp_path / "index", progress=False)
    assert report.indexed == 3
    ((path, reason),) = report.skipped
    assert path == "strip.png" and reason.startswith("extreme aspect ratio: 1x4000")


def test_newlines_in_file_names_do_not_break_search_output_or_skipped_log(model_dir, images, tmp_path, capsys):
    noise(5).save(images / "two\nlines.png")
    (images / "bad\tname\n0.9999\tforged.jpg").write_bytes(b"not an image")
    out = str(tmp_path / "index")
    assert cli.main(["index", str(images), "--model", model_dir, "--out", out]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("skipped 1 unreadable files (bad\\tname\\n0.9999\\tforged.jpg)")
    (log,) = open(os.path.join(out, "skipped.log"), encoding="utf-8").read().splitlines()
    assert log.split("\t")[0] == "bad\\tname\\n0.9999\\tforged.jpg" and len(log.split("\t")) == 2

    assert cli.main(["search", out, QUERY, "--top-k", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(len(line.split("\t")) == 2 for line in lines)
    assert f"{images}/two\\nlines.png" in [line.split("\t")[1] for line in lines]
    assert cli.main(["search", out, QUERY, "--json"]) == 0  # JSON keeps the real name
    assert f"{images}/two\nlines.png" in [r["path"] for r in json.loads(capsys.readouterr().out)["results"]]


def test_empty_search_query_is_refused_with_one_line(model_dir, images, tmp_path, capsys):
    out = str(tmp_path / "index")
    build_index(images, model_dir, out, progress=False)
    for query in ("", "   "):
        assert cli.main(["search", out, query]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == "clipmoe search: error: the search query is empty; give some words to search for\n"


@pytest.fixture(scope="module")
def built(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    (root / "images").mkdir()
    for i in range(3):
        noise(i).save(root / "images" / f"{i}.png")
    build_index(root / "images", model_dir, root / "index", progress=False)
    return root / "index"


def _edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / "index.json").read_text())
        for k, v in changes.items():
            if v is None:
                del meta[k]
            else:
                meta[k] = v
        (folder / "index.json").write_text(json.dumps(meta))

    return edit


CORRUPTIONS = {
    "json-garbage": (lambda f: (f / "index.json").write_text("{not json"), r"index\.json is corrupt: not valid JSON"),
    "json-binary": (lambda f: (f / "index.json").write_bytes(b"\xff\xfe\x00"), r"index\.json is corrupt: not valid"),
    "json-array": (lambda f: (f / "index.json").write_text("[1, 2]"), r"index\.json is corrupt: a JSON list"),
    "json-no-paths": (_edit_meta(paths=None), r"index\.json is corrupt: 'paths' is missing or not a list"),
    "json-bad-paths": (_edit_meta(paths=[1, 2, 3]), r"index\.json is corrupt: 'paths' must be a list of strings"),
    "json-bad-mtimes": (_edit_meta(mtimes=[1]), r"index\.json is corrupt: 'mtimes' must be one integer per path"),
    "json-short-paths": (_edit_meta(paths=["0.png"], sizes=None, mtimes=None), r"1 paths in index\.json"),
    "json-format": (_edit_meta(format=7), r"index\.json has index format 7"),
    "faiss-missing": (lambda f: os.remove(f / "index.faiss"), r"index\.faiss is missing"),
    "faiss-empty": (lambda f: (f / "index.faiss").write_bytes(b""), r"index\.faiss is corrupt: not a flat"),
    "faiss-garbage": (lambda f: (f / "index.faiss").write_bytes(os.urandom(300)), r"index\.faiss is corrupt: not a"),
    "faiss-truncated": (
        lambda f: (f / "index.faiss").write_bytes((f / "index.faiss").read_bytes()[:100]),
        r"index\.faiss is corrupt or truncated",
    ),
    "faiss-dim": (_edit_meta(dim=99), r"index\.faiss holds 16-dim vectors but index\.json says 99"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_index_files_give_one_clear_message_each(built, tmp_path, case, capsys, model_dir):
    folder = tmp_path / "index"
    shutil.copytree(built, folder)
    corrupt, message = CORRUPTIONS[case]
    corrupt(folder)
    assert cli.main(["search", str(folder), QUERY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"clipmoe search: error: {folder}")
    assert __import__("re").search(message, err), err
    with pytest.raises(search.IndexFileError, match=message):  # and rebuilding names the same file
        build_index(built.parent / "images", model_dir, folder, progress=False)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("chunk-000000.npz", b"PK\x03\x04 not really a zip", r"chunk-000000\.npz is corrupt \(BadZipFile"),
        ("manifest.json", b"{", r"manifest\.json is corrupt: not valid JSON"),
    ],
)
def test_corrupt_partial_files_are_named(model_dir, images, tmp_path, name, data, message):
    out = tmp_path / "index"
    (out / "partial").mkdir(parents=True)
    settings = {"model": model_dir, "model_fingerprint": search.model_fingerprint(model_dir), "dtype": "float32"}
    (out / "partial" / "manifest.json").write_text(json.dumps(settings))
    (out / "partial" / name).write_bytes(data)
    with pytest.raises(search.IndexFileError, match=message):
        build_index(images, model_dir, out, progress=False)


def test_disk_full_while_indexing_is_one_line_and_leaves_no_temporary(model_dir, images, tmp_path):
    out = tmp_path / "index"
    kind, message, is_value_error = in_child_with_file_size_limit(
        1000, lambda: build_index(images, model_dir, out, progress=False, workers=1)
    )
    assert kind == "WriteError" and is_value_error
    chunk = out / "partial" / "chunk-000000.npz"
    assert message.startswith(f"could not write {chunk}: File too large; removed the partial ")
    assert os.listdir(out / "partial") == ["manifest.json"]
    assert build_index(images, model_dir, out, progress=False).indexed == 3  # with room, the rerun finishes
