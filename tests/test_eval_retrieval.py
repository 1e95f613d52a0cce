"""Zero-shot retrieval: equality with clip_benchmark, perfect and shuffled models, chunked top-k."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipmoe.eval import evaluate_retrieval, load_wds, retrieval_metrics, topk_similarity
from clipmoe.eval.clip_benchmark import eval_loader, wrap
from conftest import WORDS, make_tiny_clip
from test_eval_data import (
    LookupClip,
    id_image,
    noise_image,
    write_wds_retrieval,
)


def _captions(n: int, seed: int = 0) -> list[list[str]]:
    """1 to 3 distinct word-salad captions per image, from the tiny tokenizer's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        count = 1 + i % 3
        out.append(
            [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (6,), generator=g)) + f" {i}" for _ in range(count)]
        )
    return out


def _lookup_model(num_images: int, captions: list[list[str]], noise: float, shuffle: bool = False, seed: int = 0):
    """Caption features = their image's feature (+ noise); ``shuffle`` gives each caption another image's."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, 32, generator=g), dim=-1)
    owner = torch.randperm(num_images, generator=g) if shuffle else torch.arange(num_images)
    texts = {}
    for i, caps in enumerate(captions):
        for c in caps:
            texts[c] = images[owner[i]] + noise * torch.randn(32, generator=g)
    return LookupClip(images, texts)


@pytest.mark.parametrize("which", ["tiny_clip", "noisy_lookup"])
def test_retrieval_equals_clip_benchmark(tmp_path, which):
    from clip_benchmark.metrics import zeroshot_retrieval

    n = 30
    captions = _captions(n)
    if which == "tiny_clip":
        model, images = make_tiny_clip(), [noise_image(i) for i in range(n)]
    else:  # mid-range scores, so that every R@k is informative
        model, images = _lookup_model(n, captions, noise=0.5), [id_image(i) for i in range(n)]
    data = load_wds(write_wds_retrieval(tmp_path / "ret", images, captions, shards=3))

    ours = evaluate_retrieval(model, data, batch_size=7)
    cb_model, transform, tokenizer = wrap(model)
    theirs = zeroshot_retrieval.evaluate(
        cb_model,
        eval_loader(data, transform, batch_size=5),
        tokenizer,
        "cpu",
        amp=False,
        recall_k_list=[1, 5, 10],
    )
    assert ours["num_images"] == n and ours["num_texts"] == sum(map(len, captions))
    for k in (1, 5, 10):
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(100 * theirs[f"text_retrieval_recall@{k}"], abs=1e-4)
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(100 * theirs[f"image_retrieval_recall@{k}"], abs=1e-4)
    if which == "noisy_lookup":
        assert 10 < ours["text_to_image_R@1"] < 90 and 10 < ours["image_to_text_R@1"] < 90


def test_perfect_model_scores_100_and_shuffled_near_chance(tmp_path):
    n = 200
    captions = [[f"caption {i} a", f"caption {i} b"] for i in range(n)]
    data = load_wds(write_wds_retrieval(tmp_path / "ret", [id_image(i) for i in range(n)], captions, shards=2))

    perfect = evaluate_retrieval(_lookup_model(n, captions, noise=0.0), data, batch_size=64)
    assert all(perfect[f"{d}_R@{k}"] == 100.0 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))

    shuffled = evaluate_retrieval(_lookup_model(n, captions, noise=0.0, shuffle=True), data, batch_size=64)
    for k in (1, 5, 10):  # chance: k / n for text->image; about 2k / 2n for image->text
        assert shuffled[f"text_to_image_R@{k}"] < 100 * 3 * k / n
        assert shuffled[f"image_to_text_R@{k}"] < 100 * 3 * k / n
    assert shuffled["text_to_image_R@10"] > 100 * 1 / n  # not zero: the model ranks at random, not adversarially


def test_retrieval_metrics_by_hand():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2.
    images = torch.eye(3)
    texts = F.normalize(torch.tensor([[1.0, 0.2, 0], [0, 1, 0.1], [0, 1, 0], [0.9, 0, 0.5], [0, 0, 1]]), dim=-1)
    m = retrieval_metrics(images, texts, [0, 0, 1, 2, 2], ks=(1, 2))
    # text->image top-1: captions 0 (img 0), 2 (img 1), 4 (img 2) hit; 1 and 3 miss -> 3/5.
    assert m["text_to_image_R@1"] == pytest.approx(60.0)
    # image->text top-1: image 0 -> caption 0 (0.98 beats caption 3's 0.87), image 1 -> caption 2,
    # image 2 -> caption 4: all hits.
    assert m["image_to_text_R@1"] == pytest.approx(100.0)
    # top-2: caption 1 still misses (image 0 scores 0, last of three); caption 3 now finds image 2.
    assert m["text_to_image_R@2"] == pytest.approx(80.0)
    with pytest.raises(ValueError, match="caption->image"):
        retrieval_metrics(images, texts, [0, 1])


def test_captions_read_as_one_text_are_one_candidate_for_each_of_their_images(tmp_path):
    """Images that share a caption string (the world's ordinary captions name three attributes) tie exactly on
    it; which caption ``topk`` ranks first is then arbitrary and changes with the ks asked. One candidate per
    text, a hit for every image it captions: a model that reads what the captions say scores 100, whatever
    the ks, and the numbers no longer depend on the tie order."""
    groups = 12  # 48 images, 4 per group; every image of a group has the group's two captions
    n = 4 * groups
    captions = [[f"caption {i // 4} a", f"caption {i // 4} b"] for i in range(n)]
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(groups, 32, generator=g), dim=-1)
    images = F.normalize(centres.repeat_interleave(4, 0) + 0.05 * torch.randn(n, 32, generator=g), dim=-1)
    texts = {c: centres[i // 4] for i, caps in enumerate(captions) for c in caps}
    data = load_wds(write_wds_retrieval(tmp_path / "ret", [id_image(i) for i in range(n)], captions, shards=2))
    reads_the_captions = LookupClip(images, texts)
    for ks in ((1,), (1, 5, 10), (5, 10, 50)):
        m = evaluate_retrieval(reads_the_captions, data, ks=ks, batch_size=16)
        assert all(m[f"{d}_R@{k}"] == 100.0 for d in ("image_to_text", "text_to_image") for k in ks), (ks, m)

    # the same features with every caption taken as its own text: what the tie order left (at most 1 in 4)
    flat = [c for caps in captions for c in caps]
    index = [i for i, caps in enumerate(captions) for _ in caps]
    features = F.normalize(torch.stack([texts[c] for c in flat]), dim=-1)
    by_instance = retrieval_metrics(images, features, index, ks=(1,))
    assert by_instance["text_to_image_R@1"] <= 25.0 + 1e-6
    by_text = retrieval_metrics(images, features, index, ks=(1,), same_text=[flat.index(c) for c in flat])
    assert by_text == {"image_to_text_R@1": 100.0, "text_to_image_R@1": 100.0}
    with pytest.raises(ValueError, match="same_text ids"):
        retrieval_metrics(images, features, index, same_text=[0, 1])


def test_evaluation_runs_in_eval_mode_and_gives_the_callers_mode_back(tmp_path):
    """A MoE left in training mode (expert dropout on) would give other features at each call."""
    from clipmoe import sparse_upcycle
    from clipmoe.eval.features import encode_texts

    moe = sparse_upcycle(make_tiny_clip(), 4, top_k=2, noise=0.01, expert_dropout=0.5).train()
    n = 12
    captions = _captions(n)
    data = load_wds(write_wds_retrieval(tmp_path / "ret", [noise_image(i) for i in range(n)], captions, shards=1))
    first, second = evaluate_retrieval(moe, data, batch_size=5), evaluate_retrieval(moe, data, batch_size=5)
    assert first == second and moe.training
    texts = [c for caps in captions for c in caps]
    in_training = encode_texts(moe, texts, batch_size=4)
    assert moe.training
    assert torch.equal(in_training, encode_texts(moe.eval(), texts, batch_size=4))


def test_a_moe_that_drops_tokens_at_inference_is_evaluated_with_a_warning(tmp_path):
    """Its features depend on which inputs share a batch: the results of two batch sizes differ, and the
    evaluation says so instead of reporting them as the model's."""
    import warnings

    from clipmoe import sparse_upcycle

    n = 12
    data = load_wds(write_wds_retrieval(tmp_path / "ret", [noise_image(i) for i in range(n)], _captions(n), shards=1))
    dropless = sparse_upcycle(make_tiny_clip(), 4, top_k=2, noise=0.05, capacity_factor=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dropless at inference (the default): no warning
        evaluate_retrieval(dropless, data, batch_size=5)
    dropping = sparse_upcycle(make_tiny_clip(), 4, top_k=2, noise=0.05, capacity_factor=0.5, capacity_at_inference=True)
    with pytest.warns(UserWarning, match=r"drops tokens at inference \(capacity_at_inference, capacity_factor 0.5\)"):
        small, whole = (
            evaluate_retrieval(dropping, data, batch_size=3),
            evaluate_retrieval(dropping, data, batch_size=n),
        )
    assert small != whole


def test_chunked_topk_equals_full_topk():
    g = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(37, 8, generator=g), torch.randn(101, 8, generator=g)
    scores, indices = topk_similarity(queries, keys, 10, query_chunk=5, key_chunk=13)
    full = (queries @ keys.T).topk(10, dim=1)
    assert torch.allclose(scores, full.values, atol=1e-6)
    assert torch.equal(indices, full.indices)
    scores, indices = topk_similarity(queries[:3], keys[:4], 10, key_chunk=3)  # k capped at the keys
    assert indices.shape == (3, 4) and sorted(indices[0].tolist()) == [0, 1, 2, 3]


def test_encode_in_lower_precision_and_refuse_precision_the_weights_lack():
    from clipmoe.eval import encode_images

    model = make_tiny_clip()
    images = [noise_image(i) for i in range(4)]
    fp32 = encode_images(model, images)
    bf16 = encode_images(model, images, dtype=torch.bfloat16)  # autocast over fp32 weights
    assert fp32.dtype == bf16.dtype == torch.float32  # features always come back fp32
    assert not torch.equal(fp32, bf16) and (fp32 * bf16).sum(1).min() > 0.99
    model.to(torch.bfloat16)
    assert (encode_images(model, images) * fp32).sum(1).min() > 0.99  # bf16 weights: inputs follow them
    with pytest.raises(ValueError, match="weights are torch.bfloat16; load it in torch.float32"):
        encode_images(model, images, dtype=torch.float32)
