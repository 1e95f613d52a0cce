"""Checkpoint import: tiny OpenAI-style, official CLIP-MoE and HF checkpoints are written here, converted, and
compared with a reference CLIP forward written in this file in plain torch (independent of the converter: OpenAI's
sequence-first blocks with ``multi_head_attention_forward`` on the packed in_proj, QuickGELU, argmax-EOT pooling,
and the official MoE block's softmax -> top-k -> renormalise -> ``index_add_`` of weighted experts)."""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import clipmoe
from clipmoe import cli
from clipmoe.data.processing import build_word_tokenizer
from clipmoe.formats.convert import attach_tokenizer, convert_file, detect_format, from_state_dict, read_torchscript
from clipmoe.formats.load import CheckpointError

VISION_WIDTH, VISION_LAYERS, PATCH, IMAGE = 128, 2, 8, 32  # 128 wide -> 2 heads by the 64-dim rule
TEXT_WIDTH, TEXT_LAYERS, CONTEXT, VOCAB, EMBED = 64, 2, 16, 50, 32
NUM_EXPERTS = 4


# ---------------------------------------------------------------------------------------------------------------
# Tiny checkpoints in OpenAI / official CLIP-MoE naming


def openai_state_dict(
    seed: int = 0,
    moe: dict[str, list[int]] | None = None,
    context: int = CONTEXT,
    long_clip: bool = False,
    text_width: int = TEXT_WIDTH,
) -> dict[str, torch.Tensor]:
    """Random tensors of consistent shapes; ``moe`` names the blocks per tower that hold experts and a gate."""
    g = torch.Generator().manual_seed(seed)
    moe = moe or {}
    sd: dict[str, torch.Tensor] = {}

    def rand(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    def norm(name, d):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + rand(d, scale=0.1), rand(d, scale=0.1)

    def ffn(p, d):
        sd[p + "c_fc.weight"], sd[p + "c_fc.bias"] = rand(4 * d, d, scale=d**-0.5), rand(4 * d, scale=0.1)
        sd[p + "c_proj.weight"], sd[p + "c_proj.bias"] = rand(d, 4 * d, scale=(4 * d) ** -0.5), rand(d, scale=0.1)

    def blocks(prefix, tower, d, layers):
        for i in range(layers):
            p = f"{prefix}{i}."
            norm(p + "ln_1", d)
            norm(p + "ln_2", d)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = (
                rand(3 * d, d, scale=d**-0.5),
                rand(3 * d, scale=0.1),
            )
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = rand(d, d, scale=d**-0.5), rand(d, scale=0.1)
            if i in moe.get(tower, []):
                sd[p + "gate.weight"] = rand(NUM_EXPERTS, d, scale=d**-0.5)
                for k in range(NUM_EXPERTS):
                    ffn(f"{p}experts.{k}.", d)
            else:
                ffn(p + "mlp.", d)

    sd["visual.conv1.weight"] = rand(VISION_WIDTH, 3, PATCH, PATCH, scale=0.1)
    sd["visual.class_embedding"] = rand(VISION_WIDTH, scale=1.0)
    sd["visual.positional_embedding"] = rand((IMAGE // PATCH) ** 2 + 1, VISION_WIDTH, scale=0.3)
    norm("visual.ln_pre", VISION_WIDTH)
    blocks("visual.transformer.resblocks.", "vision", VISION_WIDTH, VISION_LAYERS)
    norm("visual.ln_post", VISION_WIDTH)
    sd["visual.proj"] = rand(VISION_WIDTH, EMBED, scale=VISION_WIDTH**-0.5)
    sd["token_embedding.weight"] = rand(VOCAB, text_width, scale=1.0)
    sd["positional_embedding"] = rand(context, text_width, scale=0.3)
    if long_clip:
        sd["positional_embedding_res"] = rand(context, text_width, scale=0.3)
    blocks("transformer.resblocks.", "text", text_width, TEXT_LAYERS)
    norm("ln_final", text_width)
    sd["text_projection"] = rand(text_width, EMBED, scale=text_width**-0.5)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return sd


def token_ids(n: int, context: int, seed: int = 0) -> torch.Tensor:
    """OpenAI-style ids: <sot>=VOCAB-2, words, <eot>=VOCAB-1, zero padding; one row fills the whole context."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, context, dtype=torch.long)
    for row in range(n):
        length = context if row == 0 else int(torch.randint(3, context, (1,), generator=g))
        ids[row, 0], ids[row, length - 1] = VOCAB - 2, VOCAB - 1
        ids[row, 1 : length - 1] = torch.randint(1, VOCAB - 2, (length - 2,), generator=g)
    return ids


# ---------------------------------------------------------------------------------------------------------------
# Reference forward (OpenAI CLIP + official CLIP-MoE block), straight from the OpenAI-named tensors


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def ref_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])


def ref_ffn(h, sd, p, act):
    return F.linear(
        act(F.linear(h, sd[p + "c_fc.weight"], sd[p + "c_fc.bias"])), sd[p + "c_proj.weight"], sd[p + "c_proj.bias"]
    )


def ref_moe(h, sd, p, top_k, act):
    flat = h.reshape(-1, h.shape[-1])
    probs = F.linear(flat, sd[p + "gate.weight"]).softmax(dim=-1, dtype=torch.float)
    weights, chosen = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e in range(sd[p + "gate.weight"].shape[0]):
        token, slot = torch.where(chosen == e)
        out.index_add_(0, token, ref_ffn(flat[token], sd, f"{p}experts.{e}.", act) * weights[token, slot, None])
    return out.view_as(h)


def ref_block(x, sd, p, mask, top_k, act):  # x: [seq, batch, width], OpenAI's layout
    d = x.shape[-1]
    h = ref_norm(x, sd, p + "ln_1")
    attn, _ = F.multi_head_attention_forward(
        h, h, h, d, d // 64, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=mask,
    )  # fmt: skip
    x = x + attn
    h = ref_norm(x, sd, p + "ln_2")
    return x + (ref_moe(h, sd, p, top_k, act) if p + "gate.weight" in sd else ref_ffn(h, sd, p + "mlp.", act))


def ref_encode_image(sd, pixels, top_k=2, act=quick_gelu):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
        + sd["visual.positional_embedding"]
    )
    x = ref_norm(x, sd, "visual.ln_pre").transpose(0, 1)
    for i in range(VISION_LAYERS):
        x = ref_block(x, sd, f"visual.transformer.resblocks.{i}.", None, top_k, act)
    return ref_norm(x[0], sd, "visual.ln_post") @ sd["visual.proj"]


def ref_encode_text(sd, ids, top_k=2, act=quick_gelu):
    length = ids.shape[1]
    pos = sd["positional_embedding"]
    if "positional_embedding_res" in sd:  # the official code: pe * mask1 + pe_res * mask2, split at row 20
        mask1 = torch.zeros(length, 1)
        mask1[:20] = 1
        pos = pos * mask1 + sd["positional_embedding_res"] * (1 - mask1)
    x = (sd["token_embedding.weight"][ids] + pos).transpose(0, 1)
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(TEXT_LAYERS):
        x = ref_block(x, sd, f"transformer.resblocks.{i}.", causal, top_k, act)
    x = ref_norm(x.transpose(0, 1), sd, "ln_final")
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def pixels(n=3, seed=1):
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def assert_matches_reference(model, sd, context=CONTEXT, top_k=2, act=quick_gelu):
    images, ids = pixels(), token_ids(4, context)
    with torch.no_grad():
        got_image, got_text = model.encode_image(images), model.encode_text(ids)
        want_image, want_text = ref_encode_image(sd, images, top_k, act), ref_encode_text(sd, ids, top_k, act)
    assert want_image.std() > 0.1 and want_text.std() > 0.1  # features are not degenerate
    torch.testing.assert_close(got_image, want_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_text, want_text, atol=1e-5, rtol=0)


def write(sd, path):
    path = str(path)
    if path.endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Conversions that must reproduce the reference


@pytest.mark.parametrize("name", ["ViT-tiny.pt", "open_clip_model.safetensors", "pytorch_model.bin"])
def test_openai_checkpoint_converts_with_inferred_config(tmp_path, name):
    sd = openai_state_dict()
    model = clipmoe.load(write(sd, tmp_path / name))  # clipmoe.load dispatches files to the converter
    vc, tc = model.config.vision_config, model.config.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads) == (VISION_WIDTH, VISION_LAYERS, 2)
    assert (vc.patch_size, vc.image_size, vc.intermediate_size) == (PATCH, IMAGE, 4 * VISION_WIDTH)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads) == (TEXT_WIDTH, TEXT_LAYERS, 1)
    assert (tc.vocab_size, tc.max_position_embeddings, model.config.projection_dim) == (VOCAB, CONTEXT, EMBED)
    assert (tc.bos_token_id, tc.eos_token_id) == (VOCAB - 2, VOCAB - 1)
    assert vc.hidden_act == tc.hidden_act == "quick_gelu"
    assert model.moe_spec is None and model.image_processor.crop_size == IMAGE
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert_matches_reference(model, sd)


def test_hidden_act_override(tmp_path):
    sd = openai_state_dict(seed=3)
    model = convert_file(write(sd, tmp_path / "laion.pt"), hidden_act="gelu")
    assert model.config.vision_config.hidden_act == "gelu"
    assert_matches_reference(model, sd, act=F.gelu)


@pytest.mark.parametrize("top_k", [1, 2])
def test_official_clip_moe_release_matches_official_forward(tmp_path, top_k):
    # MoE in the last vision block and every text block; Long-CLIP positions with 4 rows past the kept 20.
    context = 24
    sd = openai_state_dict(seed=1, moe={"vision": [1], "text": [0, 1]}, context=context, long_clip=True)
    path = write(sd, tmp_path / "clip-moe-4-2.pt")
    assert detect_format(sd) == "clip-moe"
    model = convert_file(path, top_k=top_k)
    spec = model.moe_spec
    assert (spec.num_experts, spec.top_k, spec.layers) == (NUM_EXPERTS, top_k, {"vision": [1], "text": [0, 1]})
    moe = model.vision_model.encoder.layers[1].mlp
    torch.testing.assert_close(moe.w2[3], sd["visual.transformer.resblocks.1.experts.3.c_proj.weight"], rtol=0, atol=0)
    positions = model.text_model.embeddings.position_embedding.weight
    assert positions.shape[0] == context
    torch.testing.assert_close(positions[:20], sd["positional_embedding"][:20], rtol=0, atol=0)
    torch.testing.assert_close(positions[20:], sd["positional_embedding_res"][20:], rtol=0, atol=0)
    assert_matches_reference(model, sd, context=context, top_k=top_k)
    used = torch.cat(model.router_logits("text")).argmax(-1).unique()
    assert len(used) > 1  # routing really spreads over experts, so a mis-mapped expert would show


def test_hf_state_dict_file_converts(tmp_path):
    # clipmoe's own weights file (HF names, MoE blocks as mlp.router / w1..b2) converts back to the same model.
    sd = openai_state_dict(seed=2, moe={"vision": [0, 1], "text": [1]})
    first = from_state_dict(sd, top_k=2)
    path = write(first.state_dict(), tmp_path / "model.safetensors")
    second = convert_file(path, top_k=2)
    assert second.moe_spec == first.moe_spec
    images, ids = pixels(), token_ids(3, CONTEXT)
    with torch.no_grad():
        assert torch.equal(second.encode_image(images), first.encode_image(images))
        assert torch.equal(second.encode_text(ids), first.encode_text(ids))


def torchscript_archive(sd: dict[str, torch.Tensor], path) -> str:
    """A TorchScript archive holding ``sd`` under the same names, as OpenAI's JIT ``.pt`` files do."""
    root = nn.Module()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    torch.jit.save(torch.jit.script(root), str(path))
    return str(path)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torchscript_archive_is_read_without_running_it(tmp_path):
    sd = {k: v.half() for k, v in openai_state_dict(seed=4, moe={"text": [1]}).items()}  # OpenAI ships fp16 JIT
    path = torchscript_archive(sd, tmp_path / "ViT-B-32.pt")
    read = read_torchscript(path)
    assert read.keys() == sd.keys() and all(torch.equal(read[k], v) for k, v in sd.items())
    model = convert_file(path)
    reference = {k: v.float() for k, v in sd.items()}
    assert_matches_reference(model, reference)


class RunsCode:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_torchscript_archive_with_foreign_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": RunsCode(str(marker))}, protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(CheckpointError, match=r"evil\.pt is a TorchScript archive .*Re-save the model as a state dict"):
        convert_file(path)
    assert not marker.exists()


def test_pickled_code_and_non_tensors_are_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = write({"visual.proj": torch.zeros(2), "x": RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt cannot be read as a weights-only torch checkpoint"):
        convert_file(evil)
    assert not marker.exists()
    plain = write({"visual.proj": torch.zeros(2), "note": "not a tensor"}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"mixed\.pt does not hold a state dict of tensors"):
        convert_file(plain)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_wrong_file_types(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    png = tmp_path / "photo.pt"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    other_zip = tmp_path / "bundle.bin"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    renamed = tmp_path / "weights.pt"
    save_file({"a": torch.zeros(2)}, renamed)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    cases = [
        (text, "is a text file"),
        (png, "is a PNG image"),
        (other_zip, "is a zip archive but not a PyTorch checkpoint"),
        (renamed, "is a safetensors file under another name; rename it to end in .safetensors"),
        (empty, "is empty"),
    ]
    for path, problem in cases:
        with pytest.raises(CheckpointError, match=f"{path.name} {problem}"):
            convert_file(path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        convert_file(tmp_path / "missing.pt")


def test_truncated_files(tmp_path):
    sd = openai_state_dict()
    for name, match in (("model.safetensors", "is truncated"), ("model.pt", "is a truncated or corrupt zip")):
        path = write(sd, tmp_path / name)
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) - 1000])
        with pytest.raises(CheckpointError, match=f"{name} {match}"):
            convert_file(path)
    header_cut = tmp_path / "cut.safetensors"
    header_cut.write_bytes((10_000).to_bytes(8, "little") + b'{"a": ')
    with pytest.raises(CheckpointError, match="header claims 10000 bytes"):
        convert_file(header_cut)


def _without(sd, key):
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda sd: _without(sd, "transformer.resblocks.1.attn.out_proj.bias"), r"missing keys: transformer\.resblocks\.1\.attn\.out_proj\.bias"),
        (lambda sd: {**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VISION_WIDTH)}, r"unexpected keys: visual\.transformer\.resblocks\.0\.ls_1\.gamma"),
        (lambda sd: _without(sd, "visual.transformer.resblocks.1.experts.3.c_proj.bias"), r"missing keys: visual\.transformer\.resblocks\.1\.experts\.3\.c_proj\.bias"),
        (lambda sd: _without(sd, "visual.proj"), r"lacks keys needed to infer the architecture: visual\.proj"),
        (lambda sd: {**sd, "ln_final.bias": torch.zeros(TEXT_WIDTH + 1)}, r"wrong shape keys: text_model\.final_layer_norm\.bias"),
        (lambda sd: {**sd, "visual.positional_embedding": torch.zeros(18, VISION_WIDTH)}, "not a square grid"),
        (lambda sd: {"encoder.weight": torch.zeros(2)}, "unrecognised layout"),
        (lambda sd: {**sd, "visual.attnpool.positional_embedding": torch.zeros(2)}, "ResNet CLIP"),
    ],
)  # fmt: skip
def test_inconsistent_checkpoints_name_the_problem(tmp_path, mutate, problem):
    sd = mutate(openai_state_dict(moe={"vision": [1]}))
    path = write(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=problem) as info:
        convert_file(path)
    assert "broken.safetensors" in str(info.value)


def test_uninferable_settings_are_errors(tmp_path):
    moe = write(openai_state_dict(moe={"text": [1]}), tmp_path / "moe.pt")
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and the 4 experts"):
        convert_file(moe, top_k=5)
    odd = write(openai_state_dict(text_width=96), tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="text width 96 is not a multiple of 64"):
        convert_file(odd)
    with pytest.raises(ValueError, match="unknown hidden_act 'swish3'"):
        convert_file(moe, hidden_act="swish3")


def test_attached_tokenizer_decides_where_text_is_pooled(tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    build_word_tokenizer("a photo of a red cube".split(), context_length=CONTEXT).save_pretrained(tokenizer_dir)
    model = from_state_dict(openai_state_dict())
    attach_tokenizer(model, tokenizer_dir)
    ids = model.tokenizer(["a red cube", "a photo of a cube"])["input_ids"]  # EOS id 3, not the largest id
    eos_at = (ids == 3).int().argmax(dim=-1)
    with torch.no_grad():
        hidden = model.text_model(input_ids=ids).last_hidden_state
        want = model.text_projection(hidden[torch.arange(len(ids)), eos_at])
        torch.testing.assert_close(model.encode_text(ids), want, rtol=0, atol=0)
    small_vocab = from_state_dict({**openai_state_dict(), "token_embedding.weight": torch.zeros(5, TEXT_WIDTH)})
    with pytest.raises(ValueError, match="has 9 tokens; the model embeds only 5"):
        attach_tokenizer(small_vocab, tokenizer_dir)


# ---------------------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def convert_cli(monkeypatch):
    """``clipmoe.cli.main``, which builds only the chosen subcommand's arguments."""
    return cli.main


def test_cli_convert_writes_a_loadable_folder(tmp_path, capsys, convert_cli):
    sd = openai_state_dict(seed=5, moe={"vision": [1], "text": [1]}, context=24, long_clip=True)
    src, dst = write(sd, tmp_path / "clip-moe.pt"), tmp_path / "out"
    assert convert_cli(["convert", src, str(dst), "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "converted clip-moe checkpoint" in out and "4 experts top-1" in out
    assert "holds no tokenizer" in out
    model = clipmoe.load(dst)
    assert model.moe_spec.top_k == 1 and getattr(model, "tokenizer", None) is None
    with open(dst / "preprocessor_config.json") as f:
        assert json.load(f)["crop_size"] == {"height": IMAGE, "width": IMAGE}
    assert_matches_reference(model, sd, context=24, top_k=1)


def test_cli_convert_adds_tokenizer_and_preprocessing(tmp_path, capsys, convert_cli):
    tokenizer_dir = tmp_path / "tokenizer"
    build_word_tokenizer("a photo of a red cube".split(), context_length=CONTEXT).save_pretrained(tokenizer_dir)
    src, dst = write(openai_state_dict(), tmp_path / "clip.safetensors"), tmp_path / "out"
    argv = ["convert", src, str(dst), "--tokenizer", str(tokenizer_dir), "--image-size", "40"]
    argv += ["--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.5", "0.5", "0.5"]
    assert convert_cli(argv) == 0
    assert "holds no tokenizer" not in capsys.readouterr().out
    model = clipmoe.load(dst)
    assert model.config.text_config.eos_token_id == model.tokenizer.hf.eos_token_id == 3  # pooling follows it
    assert (model.image_processor.size, model.image_processor.crop_size) == (40, IMAGE)
    assert model.image_processor.mean == (0.5, 0.5, 0.5)
    features = model.encode_text(**model.tokenizer(["a red cube", "a photo"]))
    assert features.shape == (2, EMBED)


def test_cli_convert_errors(tmp_path, capsys, convert_cli):
    src = write(openai_state_dict(), tmp_path / "clip.pt")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert convert_cli(["convert", src, str(existing)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (existing / "keep.txt").exists()
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    assert convert_cli(["convert", str(bad), str(tmp_path / "out")]) == 2
    assert "bad.pt is a text file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert convert_cli(["convert", src, str(tmp_path / "out"), "--top-k", "1"]) == 2  # taken and ignored before
    assert "--top-k is for MoE checkpoints; " in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert convert_cli(["convert", src, ""]) == 2  # "" was the working directory, replaced
    assert "no output folder given" in capsys.readouterr().err
    assert convert_cli(["convert", src, str(existing), "--overwrite"]) == 0
    assert not (existing / "keep.txt").exists() and (existing / "config.json").exists()
