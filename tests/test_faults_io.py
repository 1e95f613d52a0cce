"""Weights that must not load, and writes that fail (disk full): issue #17 item 8."""

from __future__ import annotations

import os
import pickle
import resource
import select
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipmoe
from clipmoe.formats import state_dict
from clipmoe.formats.state_dict import CheckpointError
from clipmoe.train.loop import CHECKPOINT, METRICS, train
from conftest import make_tiny_clip
from test_train import Synthetic, cfg, make_collate


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny"
    make_tiny_clip().save_pretrained(path)
    return path


def _rewrite(folder, edit) -> None:
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.__setitem__("logit_scale", t["logit_scale"].long()),
            r"model\.safetensors: tensor logit_scale has dtype int64; weights must be floating point",
        ),
        (
            lambda t: t["visual_projection.weight"].view(-1).__setitem__(7, float("nan")),
            r"tensor visual_projection\.weight holds 1 NaN and 0 inf value\(s\) of 512",
        ),
        (
            lambda t: t["text_model.final_layer_norm.bias"].__setitem__(0, float("-inf")),
            r"tensor text_model\.final_layer_norm\.bias holds 0 NaN and 1 inf",
        ),
    ],
    ids=["int64", "nan", "inf"],
)
def test_non_float_or_non_finite_weights_are_refused_at_load_naming_the_tensor(saved, tmp_path, edit, message):
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    clipmoe.load(folder)  # the untouched copy loads
    _rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        clipmoe.load(folder)


def in_child_with_file_size_limit(limit: int, fn) -> tuple[str, str] | None:
    """Run ``fn`` in a forked child whose files cannot grow past ``limit`` bytes (RLIMIT_FSIZE: writes fail
    with EFBIG, as on a full disk); return the exception it raised as (type name, message), or None."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_end)
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork(): no parallel regions
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            try:
                fn()
                result = None
            except Exception as e:
                result = (type(e).__name__, str(e), isinstance(e, ValueError))
            os.write(write_end, pickle.dumps(result))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 60)
        data = os.read(read_end, 1 << 20) if ready else b""
    finally:
        os.close(read_end)
        if not data:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert data, "the child died or hung"
    return pickle.loads(data)


def test_disk_full_while_saving_a_model_is_one_line_naming_it_and_leaves_no_temporary(tmp_path):
    model = make_tiny_clip()
    kind, message, is_value_error = in_child_with_file_size_limit(20_000, lambda: model.save_pretrained(tmp_path / "m"))
    assert kind == "ModelWriteError" and is_value_error  # the CLI prints ValueErrors as one line, without a traceback
    assert message.startswith(f"could not write {tmp_path / 'm'}: File too large; removed the partial ")
    assert "\n" not in message
    assert os.listdir(tmp_path) == []  # neither the model nor its temporary folder


def test_disk_full_while_writing_a_checkpoint_file_is_one_line_and_leaves_no_temporary(tmp_path):
    state = {"weights": torch.randn(50_000), "step": 3}
    path = tmp_path / "checkpoint.pt"
    kind, message, is_value_error = in_child_with_file_size_limit(
        20_000, lambda: state_dict.save_file_atomically(state, path)
    )
    assert kind == "WriteError" and is_value_error
    assert message.startswith(f"could not write {path}: File too large; removed the partial {tmp_path}/.checkpoint.pt.")
    assert os.listdir(tmp_path) == []
    state_dict.save_file_atomically(state, path)  # with room, it is written
    assert torch.equal(torch.load(path)["weights"], state["weights"])


def test_disk_full_while_writing_a_training_checkpoint_is_one_line_and_leaves_no_temporary(tmp_path):
    """The metrics fit under the limit, the checkpoint (weights and optimizer state) does not."""
    model = make_tiny_clip()
    run = tmp_path / "run"
    kind, message, is_value_error = in_child_with_file_size_limit(
        50_000, lambda: train(model, Synthetic(16), make_collate(model), cfg(steps=4), str(run))
    )
    assert kind == "WriteError" and is_value_error
    assert message.startswith(
        f"could not write {run / CHECKPOINT}: File too large; removed the partial {run}/.{CHECKPOINT}."
    )
    assert "\n" not in message
    assert sorted(os.listdir(run)) == [METRICS]  # no checkpoint, no temporary
    train(model, Synthetic(16), make_collate(model), cfg(steps=4), str(tmp_path / "roomy"))  # with room, it runs


def test_disk_full_when_allocating_the_feature_store_is_one_line_and_leaves_nothing(tmp_path):
    """Embedding writes into memory-mapped files; a sparse file meeting a full disk kills the process with SIGBUS.
    The store is allocated up front, so a full disk is one error naming the file, and nothing is left half made."""
    from clipmoe.dmu.embed import FeatureStore

    result = in_child_with_file_size_limit(100_000, lambda: FeatureStore.create(str(tmp_path), 1000, 128))
    assert result is not None, "allocating 1 MB past a 100 kB limit must fail"
    name, message, is_value_error = result
    assert name == "WriteError" and is_value_error
    assert message.startswith("could not write ") and "image.f32" in message and "\n" not in message
    assert os.listdir(tmp_path) == []
    FeatureStore.create(str(tmp_path), 10, 4)  # with room, all three files at their full size
    assert sorted(os.listdir(tmp_path)) == ["image.f32", "text.f32", "valid.u8"]
    assert os.path.getsize(tmp_path / "image.f32") == 4 * 10 * 4 and os.path.getsize(tmp_path / "valid.u8") == 10


def test_results_models_and_worlds_get_the_umask_not_the_private_mode_of_their_temporaries(tmp_path):
    """Every atomic write goes through a private temporary (mkstemp 0600, mkdtemp 0700); what is renamed into
    place must read as any new file would, or a result, a model or a world is unreadable to the user's group."""
    from clipmoe.data.world import WorldConfig, generate_world
    from clipmoe.utils.io import atomic_folder, process_umask, write_json

    def mode(path) -> int:
        return os.stat(path).st_mode & 0o777

    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        write_json(tmp_path / "results.json", {"R@1": 1.0})
        with atomic_folder(tmp_path / "index") as folder:  # a search index, a run's outputs
            (Path(folder) / "part").write_text("x")
        make_tiny_clip().save_pretrained(tmp_path / "model")
        generate_world(tmp_path / "world", WorldConfig.preset("test", train_size=4, eval_size=4), verbose=False)
    finally:
        os.umask(old)
    assert mode(tmp_path / "results.json") == 0o640
    assert mode(tmp_path / "model") == mode(tmp_path / "world") == mode(tmp_path / "index") == 0o750
    assert mode(tmp_path / "model" / "config.json") == mode(tmp_path / "world" / "world.json") == 0o640
    assert mode(tmp_path / "model" / "model.safetensors") == 0o640  # safetensors writes it private


def test_a_result_that_cannot_be_placed_is_one_error_naming_it(tmp_path):
    """A file where the result's folder should be, or a folder where the file should be: one WriteError
    naming the result (not a FileExistsError traceback, not the temporary's name)."""
    from clipmoe.utils.io import WriteError, atomic_folder, write_json

    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder").mkdir()
    under_a_file = f"{tmp_path / 'a-file'} is a file, not a folder"
    for target, reason in ((tmp_path / "a-file" / "r.json", under_a_file), (tmp_path / "a-folder", "Is a directory")):
        with pytest.raises(WriteError, match=f"could not write {target}: {reason}"):
            write_json(target, {"a": 1})
    model = tmp_path / "a-file" / "model"
    with pytest.raises(WriteError, match=f"could not write {model}: {under_a_file}"), atomic_folder(model):
        pass
    assert sorted(os.listdir(tmp_path)) == ["a-file", "a-folder"] and not os.listdir(tmp_path / "a-folder")
