"""``clipmoe pretrain CONFIG``: train a CLIP from scratch (for small domains, and the shipped tiny base).

Contrastive loss with a learnable temperature, AdamW, warmup + cosine, checkpoints, resumable: the same
training loop as every other phase, with every parameter trainable. The output is an ordinary HF CLIP
folder (config, safetensors, tokenizer, preprocessor config) that ``clipmoe.load`` and transformers open.

Config (YAML)::

    out: runs/tiny-clip                 # model folder written at the end
    data: {train: world/train, caption: "json:short", num_workers: 2}   # workers: image decoding processes
    tokenizer: {vocabulary: words.txt}  # a word list (one per line; "world" = the generated world's words)
                                        # or {folder: an HF tokenizer folder}
    model:
      image_size: 32
      patch_size: 4
      vision: {width: 128, layers: 4}   # heads = width // 64 unless given
      text: {width: 128, layers: 4, context_length: 32}
      projection_dim: 128
      hidden_act: quick_gelu
      init: openai                      # position embeddings at OpenAI CLIP's scales (default: hf, transformers')
    train: {epochs: 10, batch_size: 128, lr: 5.0e-4, weight_decay: 0.2, warmup_steps: 100}
    curve: {eval: world/eval/retrieval_short, every: 250}   # optional: held-out retrieval + temperature
                                        # every N steps into OUT.train/curve.jsonl (to see the plateau);
                                        # `attributes: WORLD` adds each attribute's zero-shot, linear probe
                                        # and state on that generated world (to see suppression form)

Paths are relative to the working directory. Rerunning the command resumes from the last checkpoint, and only
the run that wrote it: ``OUT.train/run.json`` records the seed, data, tokenizer and model, the checkpoint the
training settings; a change to any is refused, naming it (delete ``OUT.train`` to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, replace

import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from transformers.activations import ACT2FN

from ..data.collate import ClipCollator
from ..data.processing import ImageTransform, TextTokenizer, build_word_tokenizer
from ..data.readers import open_dataset
from ..data.world import is_world, world_vocabulary
from ..dmu.config import ConfigError, DataConfig, TrainConfig, build_section, diff_configs, read_yaml
from ..eval.attributes import attribute_probes, attribute_state
from ..eval.datasets import RetrievalDataset, load_wds
from ..eval.retrieval import evaluate_retrieval
from ..model.modeling import ClipMoeModel
from ..train.distributed import DistEnv, init_distributed, on_main
from ..train.loop import CHECKPOINT, drop_records_after, train
from ..utils.io import write_json

PRETRAIN_DEFAULTS = {"logit_scale": None, "label_smoothing": 0.0, "lr": 5e-4, "weight_decay": 0.2}
_MODEL_KEYS = {"image_size", "patch_size", "vision", "text", "projection_dim", "hidden_act", "init"}
INITS = ("hf", "openai")


def build_clip(model_cfg: dict, tokenizer) -> ClipMoeModel:
    """A randomly initialised HF CLIP from a compact size description (heads by the 64-dim rule)."""
    unknown = set(model_cfg) - _MODEL_KEYS
    if unknown:
        raise ConfigError(f"model: unknown keys {sorted(unknown)} (known: {sorted(_MODEL_KEYS)})")
    v, t = model_cfg.get("vision", {}), model_cfg.get("text", {})
    act = model_cfg.get("hidden_act", "quick_gelu")
    vw, tw = v.get("width", 128), t.get("width", 128)
    context = t.get("context_length", 32)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=tw,
        intermediate_size=4 * tw,
        num_hidden_layers=t.get("layers", 4),
        num_attention_heads=t.get("heads", max(1, tw // 64)),
        max_position_embeddings=context,
        hidden_act=act,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=vw,
        intermediate_size=4 * vw,
        num_hidden_layers=v.get("layers", 4),
        num_attention_heads=v.get("heads", max(1, vw // 64)),
        image_size=model_cfg.get("image_size", 32),
        patch_size=model_cfg.get("patch_size", 4),
        hidden_act=act,
    )
    proj = model_cfg.get("projection_dim", 128)
    model = ClipMoeModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=proj))
    init = model_cfg.get("init", "hf")
    if init not in INITS:
        raise ConfigError(f"model.init: {init!r} is not one of {list(INITS)}")
    if init == "openai":
        _openai_position_init(model)
    model.tokenizer = TextTokenizer(tokenizer, context)
    size = model_cfg.get("image_size", 32)
    model.image_processor = ImageTransform(size=size, crop_size=size)
    return model


@torch.no_grad()
def _openai_position_init(model: ClipMoeModel) -> None:
    """Position embeddings drawn at OpenAI CLIP's scales: width^-0.5 for the image patches, 0.01 for text.

    transformers draws both with ``initializer_range`` (0.02). At width 1,024 that is close to OpenAI's
    1024^-0.5 = 0.031, but at width 128 the patch positions start 4x weaker than OpenAI's 0.088 next to patch
    embeddings of ordinary size, so a small ViT's class token begins with almost no idea where anything is
    (a linear probe reads the quadrant of the object from a fresh model's image features at 30%, chance 25%).
    """
    vision = model.vision_model.embeddings
    vision.position_embedding.weight.normal_(0.0, vision.embed_dim**-0.5)
    model.text_model.embeddings.position_embedding.weight.normal_(0.0, 0.01)


def load_tokenizer(spec: dict, context_length: int):
    if "folder" in spec:
        return AutoTokenizer.from_pretrained(spec["folder"], local_files_only=True)
    if "vocabulary" in spec:
        if spec["vocabulary"] == "world":  # the generated world's closed vocabulary
            words = world_vocabulary()
        else:
            with open(spec["vocabulary"]) as f:
                words = [w.strip() for w in f if w.strip()]
        return build_word_tokenizer(words, context_length)
    raise ConfigError("tokenizer: give {vocabulary: WORDS_FILE} or {folder: TOKENIZER_DIR}")


@dataclass
class PretrainConfig:
    out: str
    data: DataConfig
    train: TrainConfig
    model: dict
    tokenizer: dict
    seed: int = 0
    curve: dict | None = None


_SECTIONS = {"out", "data", "tokenizer", "model", "train", "seed", "curve"}
_TOWER_KEYS = {"vision": {"width", "layers", "heads"}, "text": {"width", "layers", "heads", "context_length"}}
# TrainConfig settings pretraining has no use for (it trains every parameter of a dense CLIP: no routers, no
# clusters, no base to distil from), and the two it takes from elsewhere, so none is accepted and ignored.
_NOT_PRETRAINING = {
    "seed": "set the run's seed with the top-level `seed`",
    "num_workers": "set it as `data.num_workers`",
    **dict.fromkeys(
        (
            "trainable",
            "last_n_blocks",
            "router_lr",
            "balance_weight",
            "text_balance_factor",
            "balance_mask_padding",
            "balance_scope",
            "global_balance",
            "z_loss_weight",
            "distill_weight",
            "distill_data",
            "small_clusters",
            "min_batch",
        ),
        "a setting of the MoE phases; pretraining trains every parameter of a dense CLIP on uniform batches",
    ),
}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _model_errors(model) -> list[str]:
    """Every problem of the ``model`` section, so a typo fails here instead of building another model."""
    if not isinstance(model, dict):
        return [f"model: expected a mapping, got {model!r}"]
    errors = [f"model.{k}: unknown key (known: {sorted(_MODEL_KEYS)})" for k in sorted(set(model) - _MODEL_KEYS)]
    for key in ("image_size", "patch_size", "projection_dim"):
        if key in model and not _positive_int(model[key]):
            errors.append(f"model.{key}: expected a positive integer, got {model[key]!r}")
    image, patch = model.get("image_size", 32), model.get("patch_size", 4)
    if _positive_int(image) and _positive_int(patch) and image % patch:
        errors.append(f"model.image_size: {image} is not a multiple of patch_size {patch}")
    for tower, known in _TOWER_KEYS.items():
        spec = model.get(tower, {})
        if not isinstance(spec, dict):
            errors.append(f"model.{tower}: expected a mapping like {{width: 128, layers: 4}}, got {spec!r}")
            continue
        errors += [f"model.{tower}.{k}: unknown key (known: {sorted(known)})" for k in sorted(set(spec) - known)]
        bad = [k for k in sorted(set(spec) & known) if not _positive_int(spec[k])]
        errors += [f"model.{tower}.{k}: expected a positive integer, got {spec[k]!r}" for k in bad]
        width = spec.get("width", 128)
        heads = spec.get("heads", max(1, width // 64) if _positive_int(width) else 1)
        if not {"width", "heads"} & set(bad) and width % heads:
            errors.append(f"model.{tower}.width: {width} does not split into {heads} heads")
    act = model.get("hidden_act", "quick_gelu")
    if not isinstance(act, str) or act not in ACT2FN:
        errors.append(
            f"model.hidden_act: {act!r} is not one of transformers' activations ({', '.join(sorted(ACT2FN))})"
        )
    if model.get("init", "hf") not in INITS:
        errors.append(f"model.init: {model['init']!r} is not one of {list(INITS)}")
    return errors


def _tokenizer_errors(tok, check_paths: bool) -> list[str]:
    if not isinstance(tok, dict) or len({"vocabulary", "folder"} & set(tok)) != 1:
        return ["tokenizer: give {vocabulary: WORDS_FILE | world} or {folder: TOKENIZER_DIR}, one of the two"]
    errors = [
        f"tokenizer.{k}: unknown key (known: folder, vocabulary)" for k in sorted(set(tok) - {"vocabulary", "folder"})
    ]
    if check_paths:
        if "folder" in tok and not os.path.isdir(str(tok["folder"])):
            errors.append(f"tokenizer.folder: no such folder: {tok['folder']}")
        if tok.get("vocabulary", "world") != "world" and not os.path.isfile(str(tok["vocabulary"])):
            errors.append(f"tokenizer.vocabulary: no such word list: {tok['vocabulary']}")
    return errors


def _curve_errors(curve, check_paths: bool) -> list[str]:
    if not isinstance(curve, dict) or not {"eval", "every"} <= set(curve) <= {"eval", "every", "attributes"}:
        return ["curve: expected {eval: RETRIEVAL_SET_FOLDER, every: STEPS, attributes: WORLD (optional)}"]
    if not _positive_int(curve["every"]):
        return [f"curve.every: expected a positive integer, got {curve['every']!r}"]
    errors = []
    if check_paths:
        if not os.path.isdir(str(curve["eval"])):
            errors.append(f"curve.eval: no such folder: {curve['eval']}")
        else:
            try:
                is_retrieval = isinstance(load_wds(curve["eval"]), RetrievalDataset)
            except (OSError, ValueError) as e:
                errors.append(f"curve.eval: {curve['eval']} is not an evaluation set the curve can read ({e})")
            else:
                if not is_retrieval:
                    errors.append(
                        f"curve.eval: {curve['eval']} is a classification set; the curve measures retrieval"
                        " (a set with captions, e.g. WORLD/eval/retrieval_short)"
                    )
        if "attributes" in curve and not is_world(curve["attributes"]):
            errors.append(f"curve.attributes: {curve['attributes']} is not a generated world (no world.json)")
    return errors


def read_pretrain_config(config_path: str, check_paths: bool = True) -> PretrainConfig:
    """Read and validate a pretraining config; every problem is reported at once (paths are relative to the
    working directory)."""
    raw = read_yaml(config_path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: expected a mapping of sections ({', '.join(sorted(_SECTIONS))})")
    errors = [f"{k}: unknown key" for k in sorted(set(raw) - _SECTIONS)]
    errors += [f"{k}: required" for k in ("out", "data") if k not in raw]
    if "out" in raw and not (isinstance(raw["out"], str) and raw["out"]):
        errors.append(f"out: expected a folder path, got {raw['out']!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        errors.append(f"seed: expected a non-negative integer, got {seed!r}")
    if "curve" in raw:
        errors += _curve_errors(raw["curve"], check_paths)
    data_raw = raw.get("data", {})
    if isinstance(data_raw, dict) and "eval" in data_raw:
        errors.append("data.eval: not used by pretraining (the held-out curve reads `curve.eval`)")
        data_raw = {k: v for k, v in data_raw.items() if k != "eval"}
    data = build_section(DataConfig, data_raw, "data.", errors)
    train_raw = raw.get("train", {})
    if isinstance(train_raw, dict):
        errors += [f"train.{k}: {_NOT_PRETRAINING[k]}" for k in sorted(set(train_raw) & set(_NOT_PRETRAINING))]
        if train_raw.get("steps") and "epochs" in train_raw:
            errors.append("train.steps, train.epochs: give one (a step count would override the epochs)")
        train_raw = {**PRETRAIN_DEFAULTS, **{k: v for k, v in train_raw.items() if k not in _NOT_PRETRAINING}}
    tcfg = build_section(TrainConfig, train_raw, "train.", errors)
    errors += _model_errors(raw.get("model", {}))
    errors += _tokenizer_errors(raw.get("tokenizer", {}), check_paths)
    if errors:
        raise ConfigError(f"{config_path} has {len(errors)} problem(s):\n  - " + "\n  - ".join(errors))
    tcfg = replace(tcfg, seed=seed, num_workers=data.num_workers)
    return PretrainConfig(raw["out"], data, tcfg, raw.get("model", {}), raw["tokenizer"], seed, raw.get("curve"))


def _curve_logger(model: ClipMoeModel, spec: dict, path: str, env: DistEnv):
    """``on_step`` callback: every ``spec['every']`` steps, held-out retrieval R@1 and the learned temperature
    (and with ``spec['attributes']`` each attribute's zero-shot, linear probe and state on that world),
    measured on the main rank (its error raises on every rank)."""
    dataset = load_wds(spec["eval"])
    done: set[int] | None = None

    def log(step: int, total: int) -> None:
        nonlocal done
        if done is None:  # the first step of this process: points past the checkpoint it resumed are stale
            on_main(lambda: drop_records_after(path, step - 1), env)
            done = set()
            if os.path.exists(path):
                with open(path) as f:
                    done = {json.loads(line)["step"] for line in f if line.strip()}
        if (step % spec["every"] and step != total) or step in done:
            return
        on_main(lambda: measure(step), env)
        done.add(step)

    def measure(step: int) -> None:
        model.eval()
        with torch.no_grad():
            m = evaluate_retrieval(model, dataset, batch_size=256)
        point = {
            "step": step,
            "temperature": round(model.logit_scale.exp().item(), 3),
            "image_to_text_R@1": round(m["image_to_text_R@1"], 2),
            "text_to_image_R@1": round(m["text_to_image_R@1"], 2),
        }
        if "attributes" in spec:
            point["attributes"] = {
                name: {
                    "zero_shot": round(r["zero_shot"], 1),
                    "linear_probe": round(r["linear_probe"], 1),
                    "state": attribute_state(r["chance"], r["zero_shot"], r["linear_probe"]),
                }
                for name, r in attribute_probes(model, spec["attributes"]).items()
            }
        model.train()
        with open(path, "a") as f:
            f.write(json.dumps(point) + "\n")

    return log


RUN_FILE = "run.json"  # in OUT.train: what the checkpoint was trained with besides the training settings


def _check_resume(cfg: PretrainConfig, env: DistEnv) -> None:
    """A checkpoint resumes only the run that wrote it: the loop compares the training settings, this the
    seed, the data, the tokenizer and the model (another width would fail on load; other heads or another
    activation would not, and the saved model would be half of each). A run starting afresh records them."""
    folder = cfg.out + ".train"
    run = {"seed": cfg.seed, "data": vars(cfg.data) | {"num_workers": None}, "tokenizer": cfg.tokenizer}
    run = json.loads(json.dumps({**run, "model": cfg.model}))
    path = os.path.join(folder, RUN_FILE)
    if os.path.exists(os.path.join(folder, CHECKPOINT)) and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            changed = diff_configs(json.load(f), run)
        if changed:
            raise ConfigError(
                f"{os.path.join(folder, CHECKPOINT)} was trained with other settings ({', '.join(changed)}); delete"
                f" {folder} to start this run over"
            )
    else:
        on_main(lambda: write_json(path, run), env)


def pretrain(config_path: str, preload: bool = False) -> str:
    """Train the CLIP a pretraining config describes; ``preload`` reads every image into memory first."""
    cfg = read_pretrain_config(config_path)
    if os.path.exists(os.path.join(cfg.out, "config.json")):  # written last, by the atomic save
        print(f"{cfg.out} exists: pretraining already finished")
        return cfg.out
    if os.path.exists(cfg.out):
        raise ConfigError(f"out: {cfg.out} exists and holds no saved model; remove it or choose another `out`")
    env = init_distributed()
    _check_resume(cfg, env)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model.get("text", {}).get("context_length", 32))
    model = build_clip(cfg.model, tokenizer)
    if isinstance(cfg.train.logit_scale, (int, float)):
        # A fixed temperature is part of what the model was trained with: the saved folder carries it, so a
        # later phase with `logit_scale: model` (and the curve) use the value training used, not the init.
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.train.logit_scale))

    d = cfg.data
    dataset = open_dataset(d.train, **d.reader_options())
    if preload:
        dataset.preload()
    collate = ClipCollator(model.tokenizer, model.image_processor)
    on_step = None
    if cfg.curve:
        on_step = _curve_logger(model, cfg.curve, os.path.join(cfg.out + ".train", "curve.jsonl"), env)
    train(
        model,
        dataset,
        collate,
        cfg.train,
        cfg.out + ".train",
        env,
        desc="pretrain",
        on_step=on_step,
    )

    def save() -> None:
        model.save_pretrained(cfg.out)
        print(f"wrote {cfg.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")

    on_main(save, env)  # a failed write raises on every rank, none waits at the end of the run
    return cfg.out


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pretraining YAML (see `clipmoe pretrain --help` and docs/pretraining.md)")
    p.add_argument(
        "--preload", action="store_true", help="read every training image into memory first (slow file systems)"
    )


def run_pretrain(args: argparse.Namespace) -> None:
    pretrain(args.config, args.preload)


CLI_PRETRAIN_HELP = "Train a CLIP from scratch on image-caption data (resumable).\n\n" + (__doc__ or "")
