"""Readers for every format on files written here, each bad-input case, collation, and preprocessing parity."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipmoe.data import ClipCollator, DataError, ImageTextDataset, Record, SkipLog, open_dataset
from clipmoe.data.processing import ImageTransform


def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    """A small image whose width encodes ``i``, so a test can tell which caption it was paired with."""
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (30, 40 + i, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def caption_of(i: int) -> str:
    return f"sample {i}"


def index_of(sample) -> int:
    """The ``i`` a sample's image was made from; equals the caption's number when the pair is right."""
    return sample.image.size[0] - 40


def check_pairs(ds: ImageTextDataset) -> None:
    for s in ds:
        if s.image is not None:
            assert caption_of(index_of(s)) == s.caption, f"{s.key} is paired with the wrong caption"


# Bad inputs every layout gets, by sample number. Keys 0-9 are otherwise good.
TRUNCATED_JPEG, TRUNCATED_PNG, CORRUPT, NO_CAPTION, EMPTY_CAPTION, NO_IMAGE = 2, 3, 4, 5, 6, 7


def sample_members(i: int) -> dict[str, bytes]:
    """The files of sample ``i`` (extension -> bytes), including its planted defect."""
    members = {
        "jpg": image_bytes(i),
        "txt": caption_of(i).encode(),
        "json": json.dumps({"short": f"short {i}", "detailed": caption_of(i)}).encode(),
    }
    if i == TRUNCATED_JPEG:
        members["jpg"] = members["jpg"][: len(members["jpg"]) // 2]
    elif i == TRUNCATED_PNG:
        del members["jpg"]
        png = image_bytes(i, "PNG")
        members["png"] = png[: len(png) - 40]
    elif i == CORRUPT:
        members["jpg"] = b"\xff\xd8 definitely not a jpeg" * 10
    elif i == NO_CAPTION:
        del members["txt"]
        members["json"] = json.dumps({"short": f"short {i}"}).encode()
    elif i == EMPTY_CAPTION:
        members["txt"] = b"  \n"
    elif i == NO_IMAGE:
        del members["jpg"]
    return members


def write_files_layout(root, n: int = 10):
    for i in range(n):
        shard = root / f"{i // 5:05d}"
        shard.mkdir(parents=True, exist_ok=True)
        for ext, data in sample_members(i).items():
            (shard / f"{i:09d}.{ext}").write_bytes(data)
    (root / "00000_stats.json").write_text("{}")  # img2dataset side file: not a sample
    return root


def write_tar(path, samples: range) -> None:
    with tarfile.open(path, "w") as tar:
        for i in samples:
            for ext, data in sample_members(i).items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_files_layout_pairs_by_key_and_names_each_bad_sample(tmp_path):
    ds = open_dataset(write_files_layout(tmp_path / "data"), max_skipped_fraction=1.0)
    # Indexing finds the missing caption, empty caption and missing image; decoding finds the other three.
    assert [r.key for r in ds.records] == [f"{i // 5:05d}/{i:09d}" for i in (0, 1, 2, 3, 4, 8, 9)]
    assert {e.key: e.category for e in ds.skips.entries} == {
        f"00001/{NO_CAPTION:09d}": "missing caption",
        f"00001/{EMPTY_CAPTION:09d}": "empty caption",
        f"00001/{NO_IMAGE:09d}": "missing image",
    }
    assert ds.total == 10
    # The key with an image but no caption (5) must not shift later pairs: 8 still has caption 8.
    check_pairs(ds)
    assert ds[5].caption == caption_of(8) and index_of(ds[5]) == 8
    bad = {ds[i].key: ds[i].error for i in range(len(ds)) if ds[i].image is None}
    assert set(bad) == {f"00000/{i:09d}" for i in (TRUNCATED_JPEG, TRUNCATED_PNG, CORRUPT)}
    assert all(err.startswith("unreadable image") for err in bad.values())
    assert "truncated" in bad[f"00000/{TRUNCATED_JPEG:09d}"]


def test_json_caption_key_reads_metadata(tmp_path):
    root = write_files_layout(tmp_path / "data")
    ds = open_dataset(root, caption="json:short", max_skipped_fraction=1.0)
    assert all(r.caption == f"short {int(r.key[-9:])}" for r in ds.records)
    # 5's .json has "short", so only the missing image remains a skip; 6's empty .txt does not matter here.
    assert [e.category for e in ds.skips.entries] == ["missing image"]
    ds = open_dataset(root, caption="json:detailed", max_skipped_fraction=1.0)
    assert f"00001/{NO_CAPTION:09d}" in {e.key for e in ds.skips.entries}
    check_pairs(ds)


def test_webdataset_random_access_and_patterns(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", range(0, 6))
    write_tar(shards / "00001.tar", range(6, 12))
    for source in (
        shards,
        f"{shards}/{{00000..00001}}.tar",
        f"{shards}/*.tar",
        f"{shards}/00000.tar::{shards}/00001.tar",
    ):
        ds = open_dataset(source, max_skipped_fraction=1.0)
        assert len(ds) == 9 and ds.total == 12, source
    assert {e.category for e in ds.skips.entries} == {"missing caption", "empty caption", "missing image"}
    assert f"00000.tar/{NO_CAPTION:09d}" in {e.key for e in ds.skips.entries}
    # Random access by offset, in any order, gives the right pair.
    for i in reversed(range(len(ds))):
        s = ds[i]
        assert s.index == i
        if s.image is not None:
            assert caption_of(index_of(s)) == s.caption
    assert sum(ds[i].image is None for i in range(len(ds))) == 3
    assert open_dataset(shards / "00001.tar", caption="json:short", max_skipped_fraction=1.0)[0].caption == "short 6"


def test_dataloader_workers_collate_and_skip_log(tmp_path, tiny_clip):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", range(0, 12))
    ds = open_dataset(shards, max_skipped_fraction=0.5)
    collate = ClipCollator(tiny_clip.tokenizer, tiny_clip.image_processor)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    for _ in range(2):  # two epochs: the same corrupt images must not be counted twice
        seen = []
        for batch in loader:
            assert batch["pixel_values"].shape == (len(batch["index"]), 3, 32, 32)
            assert batch["input_ids"].shape == batch["attention_mask"].shape
            assert (batch["pixel_values"][~batch["valid"]] == 0).all()
            assert len(batch["skipped"]) == ds.record_skipped(batch)
            seen += batch["index"].tolist()
        assert seen == list(range(len(ds)))
    assert ds.skips.counts() == {
        "unreadable image": 3,
        "missing caption": 1,
        "empty caption": 1,
        "missing image": 1,
    }
    log = tmp_path / "skips.tsv"
    summary = ds.end_pass(log)
    assert summary.startswith("skipped 6 of 12 samples") and "unreadable image 3" in summary
    lines = log.read_text().splitlines()
    assert len(lines) == 7 and f"00000.tar/{CORRUPT:09d}\t{shards / '00000.tar'}\tunreadable image" in log.read_text()


def test_collator_invalid_rows_and_all_invalid_batch(tiny_clip):
    ds = ImageTextDataset([Record("good", "a red cube", "unused"), Record("bad", "a blue sphere", "unused")], SkipLog())
    good = Image.fromarray(np.full((40, 50, 3), 200, np.uint8))
    from clipmoe.data import Sample

    samples = [Sample(0, "good", good, "a red cube"), Sample(1, "bad", None, "a blue sphere", "unreadable image: x")]
    batch = ClipCollator(tiny_clip.tokenizer, tiny_clip.image_processor)(samples)
    assert batch["valid"].tolist() == [True, False]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1]
    assert torch.allclose(batch["pixel_values"][0], tiny_clip.image_processor(good))
    assert batch["skipped"] == ["bad: unreadable image: x"]
    assert ds.record_skipped(batch) == 1 and ds.skips.entries[0].reason == "unreadable image: x"
    only_bad = ClipCollator(tiny_clip.tokenizer, tiny_clip.image_processor)(samples[1:])
    assert only_bad["pixel_values"].shape == (1, 3, 32, 32) and not only_bad["valid"].any()


def write_images(folder, ids):
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (folder / f"img{i}.jpg").write_bytes(image_bytes(i))


def test_csv_and_tsv_columns_paths_and_bad_rows(tmp_path):
    write_images(tmp_path / "images", range(5))
    rows = [
        ("images/img0.jpg", caption_of(0)),
        ("images/img1.jpg", caption_of(1)),
        ("images/gone.jpg", "lost"),
        ("images/img3.jpg", ""),
        ("images/img4.jpg", 'with "quotes"\tand tab'),
    ]
    with open(tmp_path / "train.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    ds = open_dataset(tmp_path / "train.tsv", max_skipped_fraction=1.0)  # open_clip defaults: tab, filepath, title
    assert [r.caption for r in ds.records] == [caption_of(0), caption_of(1), 'with "quotes"\tand tab']
    assert {e.key: e.category for e in ds.skips.entries} == {
        "train.tsv:4": "missing image",
        "train.tsv:5": "empty caption",
    }
    assert [index_of(s) for s in ds] == [0, 1, 4]

    sub = tmp_path / "meta"
    sub.mkdir()
    with open(sub / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text"])
        w.writerows(rows[:2])
    with pytest.raises(DataError, match="no column 'filepath'.*separator"):
        open_dataset(sub / "pairs.csv")
    ds = open_dataset(sub / "pairs.csv", separator=",", image_key="path", caption_key="text", root=tmp_path)
    assert len(ds) == 2 and ds[1].caption == caption_of(1) and index_of(ds[1]) == 1
    # Without root, paths resolve against the CSV's own folder, where the images are not.
    with pytest.raises(DataError, match="no usable samples"):
        open_dataset(sub / "pairs.csv", separator=",", image_key="path", caption_key="text")


def test_jsonl_relative_paths_and_malformed_lines(tmp_path):
    write_images(tmp_path / "imgs", range(4))
    lines = [json.dumps({"image": f"imgs/img{i}.jpg", "caption": caption_of(i)}) for i in range(3)]
    lines += ["{not json", json.dumps({"image": "imgs/img3.jpg"}), json.dumps(["a list"]), ""]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    ds = open_dataset(tmp_path / "data.jsonl", max_skipped_fraction=1.0)
    assert len(ds) == 3 and ds.total == 6
    check_pairs(ds)
    assert {e.key: e.category for e in ds.skips.entries} == {
        "data.jsonl:4": "bad record",
        "data.jsonl:5": "missing caption",
        "data.jsonl:6": "bad record",
    }


def test_sharegpt4v_caption_from_conversation_and_root(tmp_path):
    write_images(tmp_path / "data" / "coco" / "train2017", range(3))

    def record(i, caption):
        return {
            "id": f"id{i}",
            "image": f"coco/train2017/img{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this photo about?"},
                {"from": "gpt", "value": caption},
            ],
        }

    records = [record(0, caption_of(0)), record(1, caption_of(1)), {"id": "id2", "image": "coco/train2017/img2.jpg"}]
    (tmp_path / "captions.json").write_text(json.dumps(records))
    ds = open_dataset(tmp_path / "captions.json", root=tmp_path / "data", max_skipped_fraction=1.0)
    assert [s.caption for s in ds] == [caption_of(0), caption_of(1)]
    check_pairs(ds)
    assert [(e.key, e.category) for e in ds.skips.entries] == [("id2", "missing caption")]
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="JSON array"):
        open_dataset(tmp_path / "bad.json")


def test_sharegpt4v_records_of_one_image_are_one_sample_each(tmp_path):
    """ShareGPT4V's ``id`` names the image; two captions of one image are two samples, not duplicate keys."""
    write_images(tmp_path / "data", range(2))
    records = [
        {"id": f"id{i}", "image": f"img{i}.jpg", "conversations": [{"value": "<image>"}, {"value": caption}]}
        for i, caption in ((0, "first caption"), (1, "other image"), (0, "second caption"), (0, "third caption"))
    ] + [{"id": "id0#2", "image": "img1.jpg", "conversations": [{"value": "<image>"}, {"value": "an id like a key"}]}]
    (tmp_path / "captions.json").write_text(json.dumps(records))
    ds = open_dataset(tmp_path / "captions.json", root=tmp_path / "data")
    assert [(s.key, s.caption) for s in ds] == [
        ("id0", "first caption"),
        ("id1", "other image"),
        ("id0#2", "second caption"),
        ("id0#3", "third caption"),
        ("id0#2#2", "an id like a key"),  # never two samples with one key
    ]


def test_skipped_fraction_threshold(tmp_path):
    root = tmp_path / "data"
    for i in range(100):
        (root / "00000").mkdir(parents=True, exist_ok=True)
        (root / "00000" / f"{i:09d}.jpg").write_bytes(image_bytes(0) if i != 50 else b"garbage")
        if i not in (10, 20):
            (root / "00000" / f"{i:09d}.txt").write_text(caption_of(i))
    with pytest.raises(DataError, match=r"skipped 2 of 100 samples \(2.00%, limit 1.00%\).*000000010.*missing caption"):
        open_dataset(root)
    (root / "00000" / "000000020.txt").write_text("back")
    ds = open_dataset(root)  # 1 of 100 is not above 1%
    assert len(ds) == 99
    ds.skips.max_fraction = 0.015
    collate = ClipCollator(
        lambda texts: {"input_ids": torch.zeros(len(texts), 2), "attention_mask": torch.ones(len(texts), 2)},
        ImageTransform(size=16, crop_size=16),
    )
    for batch in torch.utils.data.DataLoader(ds, batch_size=33, collate_fn=collate):
        ds.record_skipped(batch)
    with pytest.raises(DataError, match="unreadable image 1"):  # 2 of 100 once the garbage image is decoded
        ds.end_pass()


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "nowhere.csv")
    (tmp_path / "00.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="shard .*/01.tar does not exist"):
        open_dataset(f"{tmp_path}/{{00..01}}.tar")
    with pytest.raises(ValueError, match="unknown data format 'parquet'"):
        open_dataset(tmp_path, format="parquet")
    with pytest.raises(ValueError, match="caption must be 'txt' or 'json:KEY'"):
        open_dataset(tmp_path, caption="short")
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(ValueError, match="use caption_key"):
        open_dataset(tmp_path / "x.jsonl", caption="json:short")
    (tmp_path / "fake.tar").write_bytes(b"\x1f\x8b gzip, not a plain tar" * 40)
    with pytest.raises(DataError, match="fake.tar is not a readable uncompressed tar"):
        open_dataset(tmp_path / "fake.tar")
    with pytest.raises(ValueError, match="max_skipped_fraction"):
        SkipLog(1.5)


PARITY_CASES = [
    pytest.param(224, 224, (400, 300), "RGB", id="landscape"),
    pytest.param(224, 224, (300, 400), "RGB", id="portrait"),
    pytest.param(224, 224, (20, 13), "RGB", id="smaller-than-crop"),
    pytest.param(224, 224, (301, 299), "RGB", id="near-square"),
    pytest.param(64, 48, (97, 180), "L", id="grayscale-size-over-crop"),
    pytest.param(32, 32, (64, 64), "RGB", id="64px-to-32px"),
    pytest.param(40, 56, (256, 256), "RGB", id="crop-over-size-even-pad"),
    pytest.param(
        224,
        224,
        (97, 180),
        "RGB",
        id="odd-crop-offset",
    ),
    pytest.param(
        40,
        56,
        (400, 300),
        "RGB",
        id="odd-padding",
    ),
    pytest.param(
        224,
        224,
        (400, 300),
        "RGBA",
        id="transparency",
    ),
]


@pytest.mark.parametrize(("size", "crop", "wh", "mode"), PARITY_CASES)
def test_image_transform_matches_hf_clip_image_processor(size, crop, wh, mode):
    try:  # transformers 5 names the PIL implementation explicitly; 4.x's CLIPImageProcessor is it
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    ours = ImageTransform(size=size, crop_size=crop)
    hf = Processor(**{k: v for k, v in ours.to_processor_config().items() if k != "image_processor_type"})
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.random.default_rng(sum(wh)).integers(0, 256, (wh[1], wh[0], channels), dtype=np.uint8)
    image = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr)
    assert image.mode == mode
    expected = torch.as_tensor(np.asarray(hf(image, return_tensors="np")["pixel_values"][0]))
    got = ours(image)
    assert got.shape == expected.shape == (3, crop, crop)
    assert torch.allclose(got, expected, atol=1e-5), f"max difference {(got - expected).abs().max():.3g}"


def test_a_16_bit_greyscale_png_is_scaled_not_clipped_to_white(tmp_path):
    """PIL's RGB conversion (and so HF's processor) clips 16-bit pixels at 255; the transform scales them: a
    16-bit PNG gives the pixels of the same picture saved at 8 bits. 32-bit pixels are refused, not guessed."""
    from clipmoe.data.processing import ImageRejected

    levels = np.linspace(0, 1, 32 * 32, dtype=np.float64).reshape(32, 32)
    Image.fromarray(np.rint(levels * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.rint(levels * 255).astype(np.uint8)).save(tmp_path / "plain.png")
    deep, plain = Image.open(tmp_path / "deep.png"), Image.open(tmp_path / "plain.png")
    assert deep.mode.startswith("I") and plain.mode == "L"
    transform = ImageTransform(size=32, crop_size=32)
    assert torch.allclose(transform(deep), transform(plain), atol=1e-6)
    assert (np.asarray(deep.convert("RGB")) == 255).mean() > 0.9  # what a plain conversion would have fed
    with pytest.raises(ImageRejected, match="unsupported pixels: mode 'F'"):
        transform(Image.fromarray(levels.astype(np.float32)))
    # a 16-bit PGM opens as mode "I": the same picture again
    values = np.rint(levels * 65535).astype(">u2")
    (tmp_path / "deep.pgm").write_bytes(b"P5\n32 32\n65535\n" + values.tobytes())
    assert torch.allclose(transform(Image.open(tmp_path / "deep.pgm")), transform(plain), atol=1e-6)
    # a transparent 16-bit value still composites onto white, as an 8-bit one does
    Image.fromarray(np.rint(levels * 65535).astype(np.uint16)).save(tmp_path / "clear.png", transparency=0)
    clear = Image.open(tmp_path / "clear.png")
    assert clear.info.get("transparency") == 0
    alpha = Image.fromarray(((levels > 0) * 255).astype(np.uint8))  # only the one pixel of value 0 is clear
    expected = transform(Image.merge("LA", (plain.convert("L"), alpha)))
    got = transform(clear)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got[:, 0, 0], transform(plain)[:, 0, 0])  # white there, not black


def test_preloaded_dataset_returns_the_same_samples_without_touching_files(tmp_path):
    from clipmoe.data.readers import open_dataset

    folder = tmp_path / "files" / "00000"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i:09d}.png")
        (folder / f"{i:09d}.txt").write_text(f"caption {i}")
    ds = open_dataset(str(tmp_path / "files"))
    before = [np.asarray(ds[i].image).copy() for i in range(5)]
    ds.preload(threads=2)
    for path in folder.glob("*.png"):
        path.unlink()  # from now on only the preloaded bytes can serve images
    after = [ds[i] for i in range(5)]
    assert all(s.error is None for s in after)
    assert all(np.array_equal(np.asarray(s.image), b) for s, b in zip(after, before))
