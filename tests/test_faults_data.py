"""Hostile data files (issue #17): image bombs, duplicate and dotted tar keys, non-UTF-8 rows, weights."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from clipmoe.data import ClipCollator, DataError, open_dataset, processing
from clipmoe.data.processing import ImageTransform, TextTokenizer, build_word_tokenizer
from conftest import WORDS


def png(width: int, height: int, value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(build_word_tokenizer(WORDS, 16), 16)


# ---- item 5: image bombs -------------------------------------------------------------------------------


def test_extreme_aspect_png_is_skipped_with_reason_before_any_resize(tmp_path, tokenizer):
    """A ~100-byte 1x4000 PNG would be resized to 32x128000 (224x896000 at 224 px); it is a counted skip."""
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(png(40, 30, 10 * i))
        (tmp_path / f"{i}.txt").write_text("a red cube")
    (tmp_path / "strip.png").write_bytes(png(1, 4000))
    (tmp_path / "strip.txt").write_text("a red cube")
    assert (tmp_path / "strip.png").stat().st_size < 200
    ds = open_dataset(tmp_path, max_skipped_fraction=0.5)
    batch = ClipCollator(tokenizer, ImageTransform(size=32, crop_size=32))([ds[i] for i in range(len(ds))])
    keys = [ds.records[i].key for i in batch["index"].tolist()]
    assert batch["valid"].tolist() == [k != "strip" for k in keys]
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert ds.record_skipped(batch) == 1
    (entry,) = ds.skips.entries
    assert entry.key == "strip" and entry.category == "extreme aspect ratio"
    assert "1x4000" in entry.reason and "max_aspect_ratio 20" in entry.reason
    assert "extreme aspect ratio 1" in ds.end_pass(tmp_path / "skips.tsv")


def test_default_transform_refuses_the_224px_blow_up_and_caps_are_configurable():
    strip = Image.open(io.BytesIO(png(1, 4000)))
    with pytest.raises(
        processing.ImageRejected, match=r"extreme aspect ratio: 1x4000 \(4000.0:1 > max_aspect_ratio 20\)"
    ):
        ImageTransform()(strip)  # checked on the header: nothing decoded or resized
    big = Image.new("RGB", (300, 200))
    with pytest.raises(processing.ImageRejected, match="image too large: 300x200 = 60000 pixels > max_pixels 50000"):
        ImageTransform(size=32, crop_size=32, max_pixels=50_000)(big)
    assert ImageTransform(size=32, crop_size=32, max_aspect_ratio=None)(Image.new("RGB", (1, 100))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="max_aspect_ratio must be >= 1"):
        ImageTransform(max_aspect_ratio=0.5)


def test_pixel_cap_skips_before_decoding(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png(20, 20 + 20 * i))
        (tmp_path / f"{i}.txt").write_text("a red cube")
    ds = open_dataset(tmp_path, max_skipped_fraction=1.0, max_pixels=500)
    samples = [ds[i] for i in range(3)]
    assert samples[0].image is not None
    assert [s.error for s in samples[1:]] == [
        "image too large: 20x40 = 800 pixels > max_pixels 500",
        "image too large: 20x60 = 1200 pixels > max_pixels 500",
    ]


def _numpy_peak(fn) -> int:
    """Peak bytes numpy (and Python) allocate while ``fn`` runs; PIL's own buffers are not traced."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_crop_happens_before_float_conversion():
    """The float image is never larger than the crop, however long the (allowed) image is."""
    transform = ImageTransform(size=64, crop_size=64)
    square, long = Image.new("RGB", (64, 64), (9, 99, 199)), Image.new("RGB", (64, 1200), (9, 99, 199))
    assert torch.equal(transform(square), transform(long))  # uniform colour: same crop
    crop_float = 3 * 64 * 64 * 4
    peak_square, peak_long = _numpy_peak(lambda: transform(square)), _numpy_peak(lambda: transform(long))
    assert peak_long < 1.5 * peak_square + 4096, (peak_square, peak_long)
    assert peak_long < 6 * crop_float  # the old path held a 64x1200 float image: 15 crops' worth


# ---- item 6: silent wrong data ---------------------------------------------------------------------------


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def numbered(i: int) -> list[tuple[str, bytes]]:
    """Sample ``i``: an image whose width is 10 + i, and the caption ``cube i``."""
    return [(f"{i:04d}.png", png(10 + i, 12)), (f"{i:04d}.txt", f"cube {i}".encode())]


def test_duplicate_tar_member_is_an_error_naming_it(tmp_path):
    members = numbered(1) + numbered(2) + [("0002.txt", b"cube 3")] + numbered(4)
    write_tar(tmp_path / "a.tar", members)
    with pytest.raises(DataError, match=r"a\.tar holds the same sample file twice \(0002\.txt and 0002\.txt\)"):
        open_dataset(tmp_path / "a.tar")


def test_a_key_that_comes_back_in_a_training_shard_is_an_error_naming_it(tmp_path):
    """webdataset groups consecutive members: 0001 coming back after 0002 would be a second sample 0001."""
    write_tar(tmp_path / "a.tar", numbered(1) + numbered(2) + [("0001.json", b"{}")])
    with pytest.raises(DataError, match=r"a\.tar: sample '0001' appears twice \(again at member '0001\.json'\)"):
        open_dataset(tmp_path / "a.tar")


def test_duplicate_keys_across_shards_are_an_error_naming_them(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        write_tar(tmp_path / folder / "00000.tar", numbered(1) + numbered(2))
    with pytest.raises(DataError, match=r"duplicate sample keys: 00000\.tar/0001 \(2x\), 00000\.tar/0002 \(2x\)"):
        open_dataset(f"{tmp_path}/x/00000.tar::{tmp_path}/y/00000.tar")


def test_dotted_keys_are_read_as_webdataset_does_and_counted(tmp_path):
    members = [m for i in range(8) for m in numbered(i)]
    members.insert(8, ("0003.seg.png", png(5, 5)))  # an extra field of a sample that has its image: not a skip
    members += [("img.0001.png", png(30, 12)), ("img.0001.txt", b"dotted one"), ("img.0002.png", png(31, 12))]
    write_tar(tmp_path / "a.tar", members)
    ds = open_dataset(tmp_path / "a.tar", max_skipped_fraction=0.5)
    assert len(ds) == 8 and ds.total == 10
    assert [s.image.size[0] - 10 for s in ds] == [int(s.caption.split()[1]) for s in ds]  # pairs intact
    assert [(e.key, e.category) for e in ds.skips.entries] == [
        ("a.tar/img.0001", "dotted key"),
        ("a.tar/img.0002", "dotted key"),
    ]
    assert "webdataset reads img.0001.png as key 'img' with extension '0001.png'" in ds.skips.entries[0].reason


def test_non_utf8_rows_are_skipped_and_named_not_the_whole_file(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(png(10 + i, 12))
    csv_bytes = b"filepath\ttitle\n0.png\tcube 0\n1.png\tcube \xff 1\n2.png\tcube 2\n3.png\tcube 3\n"
    (tmp_path / "a.tsv").write_bytes(csv_bytes)
    ds = open_dataset(tmp_path / "a.tsv", max_skipped_fraction=0.5)
    assert [s.caption for s in ds] == ["cube 0", "cube 2", "cube 3"]
    (entry,) = ds.skips.entries
    assert (
        entry.key == "a.tsv:3"
        and entry.reason == "unreadable row: not UTF-8 (column 'title': byte 0xff at character 6)"
    )

    lines = [json.dumps({"image": f"{i}.png", "caption": f"cube {i}"}).encode() for i in range(4)]
    lines[2] = lines[2].replace(b"cube", b"cu\xc3be")  # a broken two-byte sequence
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = open_dataset(tmp_path / "a.jsonl", max_skipped_fraction=0.5)
    assert [s.caption for s in ds] == ["cube 0", "cube 1", "cube 3"]
    (entry,) = ds.skips.entries
    assert entry.key == "a.jsonl:3" and entry.reason.startswith("unreadable row: not UTF-8 (byte 0xc3 at character")

    records = [{"id": str(i), "image": f"{i}.png", "conversations": [{}, {"value": f"cube {i}"}]} for i in range(4)]
    raw = json.dumps(records).encode().replace(b"cube 1", b"cube \xe9 1")
    (tmp_path / "sharegpt.json").write_bytes(raw)
    ds = open_dataset(tmp_path / "sharegpt.json", max_skipped_fraction=0.5)
    assert [s.caption for s in ds] == ["cube 0", "cube 2", "cube 3"]
    assert [(e.key, e.category) for e in ds.skips.entries] == [("1", "unreadable record")]


def test_two_spellings_of_one_file_in_a_files_folder_are_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(png(10, 10))
    (tmp_path / "a.PNG").write_bytes(png(11, 10))
    (tmp_path / "a.txt").write_text("cube")
    with pytest.raises(DataError, match=r"two \.png files for key 'a'"):
        open_dataset(tmp_path)


def test_eval_webdataset_reader_refuses_a_key_that_comes_back(tmp_path):
    from clipmoe.eval.datasets import load_wds

    split = tmp_path / "test"
    split.mkdir()
    (split / "nshards.txt").write_text("1\n")
    (tmp_path / "dataset_type.txt").write_text("retrieval\n")
    members = [(f"s{i}.{ext}", data) for i in (0, 1, 0) for ext, data in (("png", png(8, 8, i)), ("txt", b"cube"))]
    write_tar(split / "0.tar", members)
    with pytest.raises(ValueError, match=r"0\.tar: sample 's0' appears twice \(again at member 's0\.png'\)"):
        load_wds(tmp_path)


def test_skip_log_escapes_control_characters_in_names(tmp_path):
    from clipmoe.data import SkipLog

    log = SkipLog()
    log.add("a\nb", "dir/x\ty.png", "unreadable image: bad\r\n")
    log.add("c\\d", "\udcffname.png", "empty caption")  # a backslash; a non-UTF-8 byte in a file name
    log.write(tmp_path / "skips.tsv")
    assert (tmp_path / "skips.tsv").read_text(encoding="utf-8").splitlines() == [
        "key\tpath\treason",
        "a\\nb\tdir/x\\ty.png\tunreadable image: bad\\r\\n",
        "c\\\\d\t\\xffname.png\tempty caption",
    ]


def test_eval_names_an_image_the_transform_refuses(tmp_path, tiny_clip):
    from clipmoe.eval.features import encode_images

    Image.new("RGB", (30, 30)).save(tmp_path / "ok.png")
    Image.new("RGB", (1, 4000)).save(tmp_path / "strip.png")
    paths = [str(tmp_path / "ok.png"), str(tmp_path / "strip.png")]
    with pytest.raises(processing.ImageRejected, match=rf"{tmp_path}/strip\.png: extreme aspect ratio: 1x4000"):
        encode_images(tiny_clip, paths)


@pytest.mark.parametrize("damage", ["cut at a header", "cut inside a header", "a header byte flipped", "zeroed tail"])
def test_a_cut_or_damaged_shard_is_an_error_not_a_shorter_dataset(tmp_path, damage):
    """tarfile reads a damaged header or a zeroed tail as the end of the archive: without the end check every
    sample after it was lost with no skip counted."""
    write_tar(tmp_path / "whole.tar", [m for i in range(10) for m in numbered(i)])
    raw = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        cut = tar.getmembers()[10].offset  # sample 5's first header
    damaged = {
        "cut at a header": raw[:cut],
        "cut inside a header": raw[: cut + 100],
        "a header byte flipped": raw[: cut + 5] + bytes([raw[cut + 5] ^ 0xFF]) + raw[cut + 6 :],
        "zeroed tail": raw[:cut] + bytes(len(raw) - cut),
    }[damage]
    (tmp_path / "a.tar").write_bytes(damaged)
    with pytest.raises(DataError, match=rf"a\.tar: after byte {cut} "):
        open_dataset(tmp_path / "a.tar", max_skipped_fraction=0.0)
    assert len(open_dataset(tmp_path / "whole.tar")) == 10  # the end marker and its padding read as the end


def test_csv_rows_a_separator_or_a_quote_would_silently_change_are_skipped_and_named(tmp_path):
    """A caption cut at an unquoted separator lost its tail; an unmatched quote merged the rows after it into
    one caption; a byte-order mark renamed the first column: each now a named skip or read right."""
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(png(10 + i, 12))
    rows = ["0.png,a dog", "1.png,a dog, running on grass", '2.png,"cat on a mat', "3.png,red square", "4.png,blue"]
    (tmp_path / "a.csv").write_text("\ufefffilepath,title\n" + "\n".join(rows) + "\n", encoding="utf-8")
    ds = open_dataset(tmp_path / "a.csv", separator=",", max_skipped_fraction=0.9)
    assert [s.caption for s in ds] == ["a dog"]
    reasons = sorted(e.reason for e in ds.skips.entries)
    assert reasons == [
        "bad row: 3 cells where the header has 2",
        "bad row: a cell runs over several lines (a caption with an unmatched quote?)",
    ]


def test_files_folders_read_linked_shards_and_only_stats_json_is_metadata(tmp_path):
    import os

    real, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder, names in ((real / "00000", ("0", "player_stats")), (elsewhere, ("1",))):
        folder.mkdir(parents=True)
        for name in names:
            (folder / f"{name}.png").write_bytes(png(12, 12))
            (folder / f"{name}.txt").write_bytes(f"\ufeffcube {name}".encode())
    (real / "00000" / "00000_stats.json").write_text("{}")
    os.symlink(elsewhere, real / "00001")
    ds = open_dataset(real, max_skipped_fraction=0.0)
    assert sorted((s.key, s.caption) for s in ds) == [
        ("00000/0", "cube 0"),
        ("00000/player_stats", "cube player_stats"),
        ("00001/1", "cube 1"),
    ]


def test_a_shard_source_part_that_names_no_shard_is_an_error(tmp_path):
    write_tar(tmp_path / "a.tar", numbered(1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="webdataset folder .*empty holds no .tar shard"):
        open_dataset(f"{tmp_path / 'a.tar'}::{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="names no shard"):
        open_dataset(f"{tmp_path / 'a.tar'}::{tmp_path}/{{02..00}}.tar")
