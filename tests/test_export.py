"""HF-native export: saved folders load with stock transformers (no clipmoe) through their remote code, and the
vision tower keeps the ``CLIPVisionModel`` call contract for LLaVA-style feature extraction."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionModel

import clipmoe
from clipmoe import cli, sparse_upcycle
from clipmoe.formats.export import export_vision_tower, vision_tower
from clipmoe.model.modeling import ClipMoeVisionModel
from conftest import make_tiny_clip

# Runs with transformers alone: clipmoe imports are refused, as on a machine without it installed.
STANDALONE = textwrap.dedent(
    """
    import sys

    class NoClipmoe:
        def find_spec(self, name, path=None, target=None):
            if name == "clipmoe" or name.startswith("clipmoe."):
                raise ImportError("clipmoe is not installed here")

    sys.meta_path.insert(0, NoClipmoe())
    try:
        import clipmoe
        sys.exit("clipmoe was importable")
    except ImportError:
        pass

    import torch
    from PIL import Image
    from transformers import AutoModel, CLIPImageProcessor

    full_dir, tower_dir, io_path = sys.argv[1:4]
    inputs = torch.load(io_path + ".in")
    full = AutoModel.from_pretrained(full_dir, trust_remote_code=True)
    out = {"full_class": f"{type(full).__module__}.{type(full).__name__}"}
    # the folder's own moe.py: the plain layer, no fast kernels registered
    remote_moe = sys.modules[type(full).__module__.rsplit(".", 1)[0] + ".moe"]
    out["kernels"] = sorted(remote_moe.EXPERT_KERNELS)
    out["dispatch"] = sorted({m.dispatch for m in full.moe_layers()})
    with torch.no_grad():
        out["image"] = full.encode_image(inputs["pixels"])
        out["text"] = full.encode_text(inputs["input_ids"], inputs["attention_mask"])

    # LLaVA's CLIPVisionTower, with its one changed line (AutoModel + trust_remote_code instead of
    # CLIPVisionModel.from_pretrained); select_layer=-2, select_feature="patch".
    image_processor = CLIPImageProcessor.from_pretrained(tower_dir)
    tower = AutoModel.from_pretrained(tower_dir, trust_remote_code=True)
    tower.requires_grad_(False)
    out["tower_class"] = f"{type(tower).__module__}.{type(tower).__name__}"
    pil_images = [Image.fromarray(a.numpy()) for a in inputs["images"]]
    images = image_processor(pil_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        outs = tower(images.to(device=tower.device, dtype=tower.dtype), output_hidden_states=True)
    out["patch_features"] = outs.hidden_states[-2][:, 1:].to(images.dtype)
    out["pixel_values"] = images
    torch.save(out, io_path + ".out")
    """
)


def _moe(layers="all"):
    moe = sparse_upcycle(make_tiny_clip(), 4, top_k=2, noise=0.05, layers=layers)
    torch.manual_seed(3)
    for m in moe.moe_layers():
        torch.nn.init.normal_(m.router.weight)  # spread tokens over experts so routing matters
    return moe


def _images(seed=0):
    # Sizes whose center-crop margins are even: for odd margins ImageTransform's crop offset rounds like
    # torchvision's and lands one pixel off HF's floor (a known difference, see test_readers.py).
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((48, 36), (36, 64))]


def test_saved_folders_load_without_clipmoe(tmp_path):
    moe = _moe()
    moe.set_moe_dispatch("loop")  # a run-time choice: not saved
    full_dir, tower_dir = tmp_path / "full", tmp_path / "tower"
    moe.save_pretrained(full_dir)  # every save is HF-native
    export_vision_tower(moe, tower_dir)
    for folder in (full_dir, tower_dir):
        config = json.loads((folder / "config.json").read_text())
        assert config["moe"] and "dispatch" not in config["moe"]
        # the remote code is the plain layer only: none of the kernels or their private torch APIs
        code = (folder / "moe.py").read_text()
        assert "class MoEFeedForward" in code and "def eager_experts" in code
        for kernel_only in ("import moe_kernels", "moe_kernels import", "_grouped_mm(", "torch._C", "Function"):
            assert kernel_only not in code, kernel_only
        assert not (folder / "moe_kernels.py").exists()
    ref = clipmoe.load(full_dir)
    images = _images()
    text = ref.tokenizer(["a photo of a red cube", "blue sphere on the left"])
    pixels = torch.stack([ref.image_processor(im) for im in images])
    arrays = [torch.from_numpy(np.array(im)) for im in images]
    torch.save({"pixels": pixels, "images": arrays, **text}, tmp_path / "io.in")

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    run = subprocess.run(
        [sys.executable, str(script), str(full_dir), str(tower_dir), str(tmp_path / "io")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "io.out")

    # The classes came from the folders' own code, not from an installed clipmoe.
    assert out["full_class"].startswith("transformers_modules.") and out["full_class"].endswith(".ClipMoeModel")
    assert out["tower_class"].endswith(".ClipMoeVisionModel")
    assert out["kernels"] == ["eager"] and out["dispatch"] == ["auto"]
    # The remote code's plain layer computes what every clipmoe kernel computes.
    for dispatch in ("eager", "loop", "grouped_mm", "auto"):
        ref.set_moe_dispatch(dispatch)
        with torch.no_grad():
            torch.testing.assert_close(out["image"], ref.encode_image(pixels), atol=1e-6, rtol=0, msg=dispatch)
            torch.testing.assert_close(out["text"], ref.encode_text(**text), atol=1e-6, rtol=0, msg=dispatch)
    with torch.no_grad():
        # LLaVA's preprocessing equals ours; its layer -2 patch selection equals our own full-model
        # forward on the same pixels (fed the pixels above, the two would differ by the preprocessing's
        # rounding, amplified through the layers).
        torch.testing.assert_close(out["pixel_values"], pixels, atol=1e-5, rtol=0)
        ours = ref.vision_model(pixel_values=out["pixel_values"], output_hidden_states=True).hidden_states
    assert out["patch_features"].shape == (2, 16, 32)  # 32 px / 8 px patches = 4x4, CLS dropped, width 32
    torch.testing.assert_close(out["patch_features"], ours[-2][:, 1:], atol=1e-6, rtol=0)


def test_vision_tower_call_contract(tmp_path):
    moe = _moe(layers={"vision": [1], "text": "all"})
    export_vision_tower(moe, tmp_path / "tower")
    tower = ClipMoeVisionModel.from_pretrained(tmp_path / "tower")
    assert len(tower.moe_layers()) == 1
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        theirs = tower(pixels, output_hidden_states=True)
        ours = moe.vision_model(pixel_values=pixels, output_hidden_states=True)
    assert len(theirs.hidden_states) == moe.config.vision_config.num_hidden_layers + 1
    for a, b in zip(theirs.hidden_states, ours.hidden_states):
        assert a.shape == (3, 17, 32)
        assert torch.equal(a, b)
    assert torch.equal(theirs.last_hidden_state, ours.last_hidden_state)
    assert torch.equal(theirs.pooler_output, ours.pooler_output)
    # The pooled output projected is the full model's image feature.
    assert torch.equal(moe.visual_projection(theirs.pooler_output), moe.encode_image(pixels))

    config = json.loads((tmp_path / "tower" / "config.json").read_text())
    assert config["model_type"] == "clip_moe_vision_model"  # its own type: CLIPVisionModel refuses it
    assert config["moe"]["layers"] == {"vision": [1]}  # the text tower's MoE layers are not the tower's business
    assert config["auto_map"] == {
        "AutoConfig": "modeling.ClipMoeVisionConfig",
        "AutoModel": "modeling.ClipMoeVisionModel",
    }
    with pytest.raises(Exception, match=r"clipmoe\.load\(folder\)"):
        CLIPVisionModel.from_pretrained(tmp_path / "tower")
    # LLaVA preprocesses with CLIPImageProcessor from the same folder; it must match our transform.
    image = _images()[0]
    hf = CLIPImageProcessor.from_pretrained(tmp_path / "tower")(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(hf, moe.image_processor(image), atol=1e-5, rtol=0)


def test_dense_vision_tower_matches_stock_clip_vision_model(tmp_path):
    """A dense tower is written exactly as transformers writes a CLIPVisionModel, so even the unchanged
    ``CLIPVisionModel.from_pretrained`` loads it (keys unprefixed, as transformers 5 saves them)."""
    dense = make_tiny_clip()
    export_vision_tower(dense, tmp_path / "ours")
    stock = CLIPVisionModel(dense.config.vision_config)
    stock.save_pretrained(tmp_path / "stock")
    ours_keys = set(load_file(tmp_path / "ours" / "model.safetensors"))
    assert ours_keys == set(load_file(tmp_path / "stock" / "model.safetensors"))
    assert all(not k.startswith("vision_model.") for k in ours_keys)
    loaded = CLIPVisionModel.from_pretrained(tmp_path / "ours")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).pooler_output, dense.vision_model(pixel_values=pixels).pooler_output)


def test_half_precision_tower_keeps_fp32_routers(tmp_path):
    moe = _moe()
    moe.save_pretrained(tmp_path / "full")
    half = clipmoe.load(tmp_path / "full", dtype=torch.bfloat16)
    tower = vision_tower(half)
    assert {m.router.weight.dtype for m in tower.moe_layers()} == {torch.float32}
    assert {m.w1.dtype for m in tower.moe_layers()} == {torch.bfloat16}
    export_vision_tower(half, tmp_path / "tower")
    saved = load_file(tmp_path / "tower" / "model.safetensors")
    assert saved["encoder.layers.0.mlp.router.weight"].dtype == torch.float32
    assert saved["encoder.layers.0.mlp.w1"].dtype == torch.bfloat16
    # fp32 values, not fp32 copies of bf16-rounded ones
    assert all(torch.equal(a.router.weight, b.router.weight) for a, b in zip(half.moe_layers(), moe.moe_layers()))


def test_export_keeps_a_half_precision_folder_half_and_refuses_non_finite_weights(tmp_path, capsys):
    """Without --dtype an export keeps the dtype the folder was stored in (load opens everything in fp32); an
    fp16 cast that overflows, or a NaN anywhere, is not saved (nothing is written)."""
    moe = _moe()
    moe.save_pretrained(tmp_path / "full")
    assert cli.main(["export", str(tmp_path / "full"), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert cli.main(["export", str(tmp_path / "bf16"), str(tmp_path / "copy")]) == 0
    saved = load_file(tmp_path / "copy" / "model.safetensors")
    assert saved["vision_model.encoder.layers.0.mlp.w1"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        moe.text_projection.weight[0, 0] = 1e6  # beyond fp16's range
    moe.save_pretrained(tmp_path / "big")
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "big"), str(tmp_path / "big16"), "--dtype", "fp16"]) == 2
    assert "text_projection.weight holds 0 NaN and 1 inf value(s)" in capsys.readouterr().err
    assert not (tmp_path / "big16").exists()


def test_saving_never_replaces_what_is_not_a_saved_model(tmp_path, capsys, monkeypatch):
    """Saving replaces the target folder whole: a folder of other files, a file, the working directory or an
    empty name used to be deleted (the current directory with `clipmoe export MODEL .`)."""
    moe = _moe()
    moe.save_pretrained(tmp_path / "full")
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    (tmp_path / "a-file").write_text("x")
    monkeypatch.chdir(tmp_path / "precious")
    for target, message in (
        (str(tmp_path / "precious"), "holds the working directory"),
        (".", "holds the working directory"),
        (str(tmp_path / "a-file"), "is a file; a model is saved as a folder"),
        (str(tmp_path / "a-file" / "sub"), "a-file/sub: File exists"),
        ("", "no folder given"),
    ):
        assert cli.main(["export", str(tmp_path / "full"), target]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", str(tmp_path / "full"), str(tmp_path / "precious")]) == 2
    assert "holds files that are not a saved model" in capsys.readouterr().err
    assert os.listdir(tmp_path / "precious") == ["thesis.tex"] and (tmp_path / "a-file").read_text() == "x"
    assert cli.main(["export", str(tmp_path / "full"), str(tmp_path / "full")]) == 0  # a saved model: replaced


def test_a_sharded_folder_and_a_broken_config_load_or_fail_naming_the_file(tmp_path):
    moe = _moe()
    moe.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    again = clipmoe.load(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(moe.state_dict().values(), again.state_dict().values()))
    from clipmoe.formats.state_dict import CheckpointError

    moe.save_pretrained(tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    text = config.read_text()
    for broken, message in (
        (text[: len(text) // 2], "config.json is not valid JSON"),
        ("[1, 2]", "config.json holds list, not a model config"),
    ):
        config.write_text(broken)
        with pytest.raises(CheckpointError, match=message):
            clipmoe.load(tmp_path / "m")


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"do_normalize": False}, "do_normalize false"),
        ({"do_rescale": False}, "do_rescale false"),
        ({"rescale_factor": 1.0}, "rescale_factor 1.0"),
        ({"do_center_crop": False}, "do_center_crop false with a shortest-edge resize"),
        ({"do_rescale": None}, "do_rescale null"),  # HF skips a step set to null
        ({"do_center_crop": None}, "do_center_crop null"),
        ({"rescale_factor": None}, "rescale_factor null"),
    ],
)
def test_a_preprocessing_clipmoe_would_not_reproduce_fails_the_load_naming_the_setting(tmp_path, setting, message):
    """The image transform always resizes, crops, rescales and normalises; a folder whose processor turns one of
    these off would be fed other pixels than it was trained on, so it is refused instead of read approximately."""
    from clipmoe.formats.state_dict import CheckpointError

    _moe().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "preprocessor_config.json"
    processor = json.loads(path.read_text())
    path.write_text(json.dumps({**processor, **setting}))
    with pytest.raises(CheckpointError, match=f"preprocessor_config.json: {message}"):
        clipmoe.load(tmp_path / "m")
    path.write_text(json.dumps({**processor, "do_normalize": True, "rescale_factor": 0.00392156862745098}))
    assert clipmoe.load(tmp_path / "m").image_processor.crop_size == processor["crop_size"]["height"]


def test_export_command(tmp_path, capsys, monkeypatch):
    moe = _moe()
    moe.save_pretrained(tmp_path / "full")
    assert cli.main(["export", str(tmp_path / "full"), str(tmp_path / "tower"), "--vision-tower"]) == 0
    assert "wrote vision tower (2 MoE layers)" in capsys.readouterr().out
    names = sorted(os.listdir(tmp_path / "tower"))
    assert names == ["config.json", "model.safetensors", "modeling.py", "moe.py", "preprocessor_config.json"]
    assert cli.main(["export", str(tmp_path / "full"), str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "modeling.py").read_text() == (tmp_path / "full" / "modeling.py").read_text()
    assert cli.main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "no model at" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_vision_tower_needs_preprocessing_config(tiny_clip, tmp_path):
    del tiny_clip.image_processor
    with pytest.raises(ValueError, match="no image_processor"):
        export_vision_tower(tiny_clip, tmp_path / "tower")
    assert not (tmp_path / "tower").exists()


def test_transformers_keeps_the_routers_of_a_half_precision_folder_in_fp32(tmp_path):
    """As clipmoe.load: AutoModel on a bf16 export gives bf16 experts and the stored fp32 routers (it cast
    them to bf16 before, so its routing differed from clipmoe's)."""
    _moe().save_pretrained(tmp_path / "full")
    assert cli.main(["export", str(tmp_path / "full"), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    code = textwrap.dedent(
        """
        import sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModel
        m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
        stored = load_file(sys.argv[1] + "/model.safetensors")
        routers = {n: p for n, p in m.named_parameters() if "router" in n}
        assert routers and all(p.dtype == torch.float32 and torch.equal(p, stored[n]) for n, p in routers.items())
        assert {p.dtype for n, p in m.named_parameters() if n not in routers} == {torch.bfloat16}
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "bf16")], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
