"""CLIP_benchmark interop: its metric functions on the registered ``clipmoe`` model type give ``clipmoe eval``'s
numbers on the generated world; registration through its ``load_clip``; one-line errors where it cannot run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import clipmoe
from clipmoe.assets import TINY_CLIP
from clipmoe.cli import main as clipmoe_main
from clipmoe.eval import load_wds, open_eval_set
from clipmoe.eval.clip_benchmark import MODEL_TYPE, eval_loader, load_clipmoe, main, register

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from clipmoe.data.world import WorldConfig, generate_world

    out = tmp_path_factory.mktemp("cb") / "world"
    generate_world(out, WorldConfig.preset("test", seed=7, train_size=8, val_size=0, eval_size=12), verbose=False)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The shipped pretrained tiny CLIP and a CLIP-MoE upcycled from it (informative zero-shot numbers)."""
    moe = tmp_path_factory.mktemp("cb") / "moe"
    clipmoe.sparse_upcycle(clipmoe.load(TINY_CLIP), num_experts=4, top_k=2, layers=2, noise=0.1).save_pretrained(moe)
    return {"dense": TINY_CLIP, "moe": str(moe)}


def _clip_benchmark(loaded, data_dir) -> dict:
    """CLIP_benchmark's own zero-shot evaluation of ``(model, transform, tokenizer)`` (fp32, as ours)."""
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    model, transform, tokenizer = loaded
    data = open_eval_set(data_dir)
    loader = eval_loader(data, transform, batch_size=10)
    if hasattr(data, "classnames"):
        return zeroshot_classification.evaluate(
            model, loader, tokenizer, data.classnames, data.templates, "cpu", amp=False
        )
    return zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])


# 12 images cannot show all 10 colours: sklearn's balanced accuracy (theirs) then warns; ours averages the same classes.
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_clip_benchmark_metrics_equal_clipmoe_eval_on_the_world(world, model_dirs, tmp_path, clip_benchmark_numpy):
    """Every retrieval and classification set of the world, a CLIP-MoE: ``clipmoe eval`` (its suite, batch 16)
    against CLIP_benchmark's evaluate functions on the model its registry loads (batch 10)."""
    out = tmp_path / "suite.json"
    argv = ["eval", model_dirs["moe"], "--task", "suite", "--data", str(world / "eval"), "--out", str(out)]
    assert clipmoe_main([*argv, "--device", "cpu", "--batch-size", "16"]) == 0
    ours = json.loads(out.read_text())
    assert "routing" in ours  # it was evaluated as a CLIP-MoE
    loaded = load_clipmoe(MODEL_TYPE, model_dirs["moe"], None, "cpu")
    compared, exact = [], 0
    for name in sorted(os.listdir(world / "eval")):
        if name.startswith("cls_"):
            theirs = _clip_benchmark(loaded, world / "eval" / name)
            assert ours[f"{name}/top1"] == pytest.approx(100 * theirs["acc1"], abs=1e-4), name
            recall = ours[f"{name}/mean_per_class_recall"]
            assert recall == pytest.approx(100 * theirs["mean_per_class_recall"], abs=1e-4), name
            if f"{name}/top5" in ours:
                assert ours[f"{name}/top5"] == pytest.approx(100 * theirs["acc5"], abs=1e-4), name
            else:  # fewer than 5 classes: neither reports top-5
                assert ours[f"{name}/num_classes"] < 5 and math.isnan(theirs["acc5"]), name
            compared.append(ours[f"{name}/top1"])
        elif name.startswith("retrieval_"):
            theirs = _clip_benchmark(loaded, world / "eval" / name)
            texts = [c for caps in load_wds(world / "eval" / name).captions for c in caps]
            # Captions repeated verbatim tie exactly: clipmoe counts such a text for each of its images, where
            # CLIP_benchmark's count depends on the tie order; so equal where every caption is its own text, and
            # never below it (a hit there is a hit here).
            unique = len(set(texts)) == len(texts)
            for k in (1, 5, 10):
                i2t, t2i = ours[f"{name}/image_to_text_R@{k}"], ours[f"{name}/text_to_image_R@{k}"]
                for value, reference in (
                    (i2t, theirs[f"text_retrieval_recall@{k}"]),
                    (t2i, theirs[f"image_retrieval_recall@{k}"]),
                ):
                    if unique:
                        assert value == pytest.approx(100 * reference, abs=1e-4), (name, k)
                    else:
                        assert value >= 100 * reference - 1e-4, (name, k)
            compared.append(ours[f"{name}/text_to_image_R@1"])
            exact += unique
    assert exact >= 1  # the detailed captions are all distinct: compared for equality
    assert len(compared) == 9  # 7 attributes (3 of them with fewer than 5 classes), short and detailed retrieval
    assert sum(0 < v < 100 for v in compared) >= 5 and len(set(compared)) > 3  # informative, not all 0 / 100


@pytest.fixture
def clip_benchmark_models(monkeypatch):
    """A fresh ``clip_benchmark.models``. Its ``__init__`` imports open_clip for its own model type; where open_clip
    cannot be installed (see docs/downstream.md) an empty module stands in for it: the ``clipmoe`` type never
    touches it."""
    if not HAS_OPEN_CLIP:
        monkeypatch.setitem(sys.modules, "open_clip", types.ModuleType("open_clip"))
    yield
    for name in [n for n in sys.modules if n == "clip_benchmark.models" or n.startswith("clip_benchmark.models.")]:
        del sys.modules[name]  # the next import sees the real environment again


def _image(i: int):
    from PIL import Image

    g = torch.Generator().manual_seed(i)
    return Image.fromarray((torch.rand(40, 56, 3, generator=g) * 255).byte().numpy())


def test_registered_type_opens_a_clipmoe_model_through_load_clip(clip_benchmark_models, model_dirs):
    register()
    register()  # idempotent
    from clip_benchmark.models import MODEL_TYPES, TYPE2FUNC, load_clip

    assert MODEL_TYPES.count(MODEL_TYPE) == 1 and TYPE2FUNC[MODEL_TYPE] is load_clipmoe
    model, transform, tokenizer = load_clip(MODEL_TYPE, "any label", model_dirs["moe"], None, "cpu")
    reference = clipmoe.load(model_dirs["moe"])
    pixels = torch.stack([transform(_image(i)) for i in range(2)])
    assert torch.equal(pixels, torch.stack([reference.image_processor(_image(i)) for i in range(2)]))
    prompts = ["a red cube", "a photo of a blue sphere"]
    ids = reference.tokenizer(prompts)
    with torch.no_grad():
        # Unnormalised projected features, as open_clip's: CLIP_benchmark normalises them itself.
        assert torch.equal(model.encode_image(pixels), reference.encode_image(pixels))
        expected = reference.encode_text(ids["input_ids"], ids["attention_mask"])
        assert torch.equal(model.encode_text(tokenizer(prompts).to("cpu")), expected)
    assert not torch.allclose(expected.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="Hugging Face cache.*HF_HOME"):
        load_clip(MODEL_TYPE, "x", model_dirs["moe"], "/some/cache", "cpu")
    with pytest.raises(ValueError, match="needs --pretrained"):
        load_clip(MODEL_TYPE, "x", "", None, "cpu")


def test_half_precision_model_takes_the_fp32_transform_output(model_dirs):
    from clipmoe.eval.clip_benchmark import wrap

    model, transform, _ = wrap(clipmoe.load(model_dirs["dense"], dtype=torch.bfloat16))
    features = model.encode_image(transform(_image(0))[None])  # fp32 pixels, bf16 weights: no dtype error
    assert features.dtype == torch.bfloat16 and features.shape == (1, 128)


@pytest.mark.skipif(HAS_OPEN_CLIP, reason="open_clip is installed: its absence cannot be shown here")
def test_without_open_clip_the_entry_point_names_it_in_one_line():
    """``python -m clipmoe.eval.clip_benchmark``: the module imports, and the missing package is named."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "clipmoe.eval.clip_benchmark", "eval", "--pretrained", TINY_CLIP]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "clipmoe-benchmark: error: CLIP_benchmark's model registry (clip_benchmark.models) needs open_clip, "
        "which is not installed (pip install open_clip_torch)"
    ]


def test_without_clip_benchmark_the_module_imports_and_main_says_how_to_install(monkeypatch, capsys):
    for name in [n for n in sys.modules if n == "clip_benchmark" or n.startswith("clip_benchmark.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)  # import clip_benchmark now fails
    with pytest.raises(
        ImportError, match=r"CLIP_benchmark is not installed \(pip install 'clipmoe\[clip-benchmark\]'\)"
    ):
        register()
    assert main(["eval"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "clipmoe-benchmark: error: CLIP_benchmark is not installed (pip install 'clipmoe[clip-benchmark]')"
    ]


def test_check_numpy_matches_what_clip_benchmark_accuracy_does():
    import numpy as np
    from clip_benchmark.metrics import zeroshot_classification

    from clipmoe.eval.clip_benchmark import check_numpy

    try:
        zeroshot_classification.accuracy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
        works = True
    except TypeError:
        works = False
    if works:
        check_numpy()
    else:
        with pytest.raises(RuntimeError, match=f"numpy {np.__version__}.*install numpy<2.4"):
            check_numpy()
    assert works == (tuple(int(p) for p in np.__version__.split(".")[:2]) < (2, 4))


def test_entry_point_makes_clipmoe_the_default_model_type_of_eval_only():
    from clipmoe.eval.clip_benchmark import _with_model_type

    assert _with_model_type(["eval", "--pretrained", "m"]) == ["eval", "--pretrained", "m", "--model_type", "clipmoe"]
    chosen = ["eval", "--pretrained", "m", "--model_type", "open_clip"]
    assert _with_model_type(chosen) == chosen
    assert _with_model_type(["eval", "--model_type=open_clip"]) == ["eval", "--model_type=open_clip"]
    assert _with_model_type(["build", "a.json"]) == ["build", "a.json"]  # its other subcommand takes no model
