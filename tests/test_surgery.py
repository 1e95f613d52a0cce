import copy

import pytest
import torch

import clipmoe
from clipmoe import CheckpointError, assemble_moe, sparse_upcycle
from clipmoe.model.surgery import find_ffns, resolve_layers
from conftest import make_tiny_clip


def features(model, batch):
    pixels, text = batch
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(**text)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_identical_experts_equal_dense_for_any_router(batch, act):
    base = make_tiny_clip(hidden_act=act)
    moe = sparse_upcycle(base, num_experts=4, top_k=2)
    for m in moe.moe_layers():
        torch.nn.init.normal_(m.router.weight, std=5.0)
    for dense, sparse in zip(features(base, batch), features(moe, batch)):
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    assert len(moe.moe_layers("vision")) == 2 and len(moe.moe_layers("text")) == 2


def test_activation_is_copied(tiny_clip):
    moe = sparse_upcycle(make_tiny_clip(hidden_act="gelu"), 2, top_k=1)
    assert type(moe.moe_layers()[0].act).__name__ == "GELUActivation"
    moe = sparse_upcycle(tiny_clip, 2, top_k=1)
    assert type(moe.moe_layers()[0].act).__name__ == "QuickGELUActivation"


def test_upcycle_uses_each_experts_ffn(tiny_clip, batch):
    experts = [tiny_clip]
    for s in range(1, 3):
        e = copy.deepcopy(tiny_clip)
        for f in find_ffns(e)["vision"] + find_ffns(e)["text"]:
            with torch.no_grad():
                f.module.fc1.weight.add_(0.1 * s)
        experts.append(e)
    moe = assemble_moe(tiny_clip, experts, top_k=2, layers={"vision": 1, "text": "all"})
    assert moe.config.moe["layers"] == {"vision": [1], "text": [0, 1]}
    layer = moe.vision_model.encoder.layers[1].mlp
    for s, e in enumerate(experts):
        torch.testing.assert_close(layer.w1[s], e.vision_model.encoder.layers[1].mlp.fc1.weight)
    # Router top-k = all experts with a router that prefers expert 2 -> output close to expert 2 alone.
    assert not isinstance(moe.vision_model.encoder.layers[0].mlp, clipmoe.MoEFeedForward)


def test_upcycle_rejects_experts_from_another_base(tiny_clip):
    other = make_tiny_clip(seed=5)
    with pytest.raises(
        ValueError,
        match=r"expert 1 is not fine-tuned from this base: non-FFN tensor text_model.embeddings.token_embedding.weight differs \(max \|diff\|",
    ):
        assemble_moe(tiny_clip, [tiny_clip, other])


def test_upcycle_accepts_state_dicts(tiny_clip):
    moe = assemble_moe(tiny_clip, [tiny_clip.state_dict(), tiny_clip.state_dict()], top_k=1)
    assert moe.config.moe["num_experts"] == 2


def test_bad_selections(tiny_clip):
    with pytest.raises(ValueError, match="top_k=3"):
        sparse_upcycle(tiny_clip, 2, top_k=3)
    with pytest.raises(ValueError, match="out of range"):
        sparse_upcycle(tiny_clip, 2, top_k=1, layers=[0, 5])
    with pytest.raises(ValueError, match="last 3 blocks"):
        sparse_upcycle(tiny_clip, 2, top_k=1, layers=3)
    with pytest.raises(ValueError, match="unknown tower"):
        resolve_layers({"audio": 1}, {"vision": 2, "text": 2})
    with pytest.raises(ValueError, match="already a CLIP-MoE"):
        sparse_upcycle(sparse_upcycle(tiny_clip, 2, top_k=1), 2, top_k=1)


def test_sparse_upcycle_noise_breaks_symmetry(tiny_clip):
    moe = sparse_upcycle(tiny_clip, 3, top_k=2, noise=0.01)
    w1 = moe.moe_layers()[0].w1
    assert not torch.equal(w1[0], w1[1])


def test_save_load_roundtrip_is_bitwise(tmp_path, tiny_clip, batch):
    moe = sparse_upcycle(tiny_clip, 4, top_k=2, noise=0.05)
    for m in moe.moe_layers():
        torch.nn.init.normal_(m.router.weight)
    moe.save_pretrained(tmp_path / "moe")
    loaded = clipmoe.load(tmp_path / "moe")
    for a, b in zip(features(moe, batch), features(loaded, batch)):
        assert torch.equal(a, b)
    assert loaded.config.moe == moe.config.moe
    # tokenizer and preprocessing travel with the folder
    text = loaded.tokenizer(["a red cube"])
    assert text["input_ids"][0, 0].item() == loaded.tokenizer.hf.bos_token_id
    assert loaded.image_processor.crop_size == 32


def test_dense_folder_loads(tiny_clip_dir, tiny_clip, batch):
    loaded = clipmoe.load(tiny_clip_dir)
    assert loaded.moe_layers() == []
    for a, b in zip(features(tiny_clip, batch), features(loaded, batch)):
        assert torch.equal(a, b)


def test_missing_and_unexpected_keys_are_errors(tmp_path, tiny_clip):
    from safetensors.torch import load_file, save_file

    tiny_clip.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    sd = load_file(weights)
    sd.pop("vision_model.encoder.layers.0.mlp.fc1.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, weights)
    with pytest.raises(
        CheckpointError,
        match=r"missing keys: vision_model.encoder.layers.0.mlp.fc1.weight.*unexpected keys: extra.weight",
    ):
        clipmoe.load(tmp_path / "m")


def test_truncated_safetensors_is_an_error(tmp_path, tiny_clip):
    tiny_clip.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        clipmoe.load(tmp_path / "m")


def test_save_is_atomic(tmp_path, tiny_clip, monkeypatch):
    target = tmp_path / "m"
    tiny_clip.save_pretrained(target)
    before = sorted(p.name for p in target.iterdir())

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tiny_clip.tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_clip.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left behind


def test_trainable_modes(tiny_clip):
    moe = sparse_upcycle(tiny_clip, 4, top_k=2)
    moe.set_trainable("router")
    names = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("router.weight") for n in names)
    moe.set_trainable("ffn")
    names = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert all(".mlp." in n and "router" not in n for n in names)
    tiny_clip.set_trainable("ffn", last_n_blocks=1)
    names = {n for n, p in tiny_clip.named_parameters() if p.requires_grad}
    assert names == {
        f"{t}_model.encoder.layers.1.mlp.{fc}.{w}"
        for t in ("vision", "text")
        for fc in ("fc1", "fc2")
        for w in ("weight", "bias")
    }
    counts = moe.parameter_counts()
    assert counts["total"] > counts["active"] > 0
