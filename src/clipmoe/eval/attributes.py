"""What a CLIP knows, suppresses or lacks of a generated world's attributes (docs/pretraining.md).

Per attribute, three readings of one frozen model: zero-shot classification (what the text side reads), a
supervised probe on the same image features (what the features hold) and a caption contrast in which only
that attribute's words change (what the text tower separates). ``attribute_state`` turns the first two into
the word the docs use for a base: known, suppressed, unaligned or absent.
"""

from __future__ import annotations

import os

import torch

from ..data.world import is_world, manifest_config, read_manifest
from ..data.world_language import ATTRIBUTE_BY_NAME, SLOT_RE, CaptionPlan
from ..model.modeling_siglip import Siglip2MoeModel, patchify
from .classification import classification_metrics, zero_shot_classifier
from .datasets import load_wds
from .features import encode_images, encode_texts, eval_mode, warn_if_batch_dependent
from .linear_probe import linear_probe_accuracy
from .mlp_probe import mlp_probe_accuracy

KNOWN_ATTRIBUTES = ("color", "background", "shape")  # what web captions almost always name
HIDDEN_ATTRIBUTES = ("size", "position", "texture", "count")  # what they name rarely: what a base can suppress
# The bar docs/pretraining.md holds every base to: a zero-shot accuracy this many points above chance reads the
# attribute; a probe this many points above the zero-shot (or above chance) holds more than the text side reads.
ABOVE_CHANCE = 5.0
PROBE_GAP = 10.0
STATES = ("known", "suppressed", "unaligned", "absent")


def attribute_state(chance: float, zero_shot: float, probe: float) -> str:
    """``suppressed``: zero-shot at least chance + 5 with the probe 10 or more above it (the testbed's premise);
    ``known``: zero-shot at least chance + 5 and within 10 of the probe; ``unaligned``: zero-shot within 5 of
    chance while the probe reads 10 or more above chance (in the features, not tied to its words); ``absent``:
    neither reads it. Percentages, compared as the docs print them (to 0.1)."""
    chance, zero_shot, probe = round(chance, 1), round(zero_shot, 1), round(probe, 1)
    if round(zero_shot - chance, 1) >= ABOVE_CHANCE:  # on the values as printed: 38.3 clears 33.3 + 5
        return "suppressed" if round(probe - zero_shot, 1) >= PROBE_GAP else "known"
    return "unaligned" if round(probe - chance, 1) >= PROBE_GAP else "absent"


# What draws a world's images: two worlds probed together must agree on these (sizes and seeds may differ).
IMAGE_SETTINGS = ("image_size", "dot_radius", "dot_color", "dot_placement", "color_jitter", "noise")


def check_worlds(world: str, probe_world: str | None, probe_train_size: int, probe_test_size: int) -> None:
    """Refuse, before any encoding, what ``read_attributes`` could not read right: a folder that is no world,
    two worlds drawn differently, a probe world with fewer evaluation images than its probes need."""
    configs = {}
    for path in (world, probe_world):
        if path is None:
            continue
        if not is_world(path):
            raise ValueError(f"{path}: not a generated world (no world.json; make one with `clipmoe world`)")
        configs[path] = manifest_config(read_manifest(path))
    if probe_world is None:
        return
    differ = [k for k in IMAGE_SETTINGS if configs[world].get(k) != configs[probe_world].get(k)]
    if differ:
        settings = ", ".join(f"{k} {configs[world].get(k)} vs {configs[probe_world].get(k)}" for k in differ)
        raise ValueError(f"{world} and {probe_world} draw their images differently ({settings}): probe on one kind")
    if min(probe_train_size, probe_test_size) < 1:
        raise ValueError("the probe train and test sizes must be positive")
    if probe_train_size + probe_test_size > configs[probe_world]["eval_size"]:
        raise ValueError(
            f"{probe_world}: {configs[probe_world]['eval_size']} evaluation images, the probes need"
            f" {probe_train_size} + {probe_test_size} (--probe-train-size, --probe-test-size; or generate the"
            " world with a larger --eval-size)"
        )


def attribute_sets(world: str) -> list[tuple[dict, object]]:
    """A generated world's attributes, each with its evaluation classification set (``eval/cls_<name>``)."""
    attributes = read_manifest(world)["attributes"]
    return [(a, load_wds(os.path.join(world, "eval", f"cls_{a['name']}"))) for a in attributes]


def attribute_probes(model, world: str, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Per attribute of a generated world, on its held-out evaluation images: zero-shot top-1 (prompt ensemble)
    and a linear probe on the same frozen image features (2-fold cross-fitted on those images, so the probe
    sees the same distribution it is scored on); ``attribute_state`` names what the two say together.
    ``chance`` is 100 / values (the states' fixed bar); ``majority`` what the best constant answer scores on
    these images, above chance where the values are unbalanced (shape on held-out colour-shape combinations)."""
    sets = attribute_sets(world)
    features = encode_images(model, sets[0][1].images, batch_size=batch_size)  # every set: the same images
    out = {}
    for a, data in sets:
        classifier = zero_shot_classifier(model, data.classnames, data.templates, batch_size=batch_size)
        zero_shot = classification_metrics(features, classifier, data.targets)["top1"]
        y, half, k = data.targets, len(data.targets) // 2, len(a["values"])
        folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
        probe = sum(linear_probe_accuracy(features[tr], y[tr], features[te], y[te], k) for tr, te in folds) / 2
        majority = 100.0 * torch.bincount(torch.as_tensor(y), minlength=k).max().item() / len(y)
        out[a["name"]] = {"chance": 100.0 / k, "majority": majority, "zero_shot": zero_shot, "linear_probe": probe}
    return out


IMAGE_FEATURES = ("embedding", "pooled", "patch_mean")


@torch.no_grad()
def image_features(model, images, kind: str = "embedding", batch_size: int = 256) -> torch.Tensor:
    """A CLIP's features of ``images`` (ImageRefs, as ``load_wds`` gives) of one ``kind``: ``embedding``, what
    zero-shot and retrieval compare (projected, L2-normalised); ``pooled``, the image tower's pooled output
    before the projection; ``patch_mean``, its last layer's patch tokens averaged (a LLaVA-style model reads the
    patch tokens of the layer before it)."""
    if kind not in IMAGE_FEATURES:
        raise ValueError(f"image features {kind!r}: choose one of {list(IMAGE_FEATURES)}")
    if kind == "embedding":
        return encode_images(model, images, batch_size=batch_size)
    param, out = next(model.parameters()), []
    # CLIP's tower puts a class token before the patches; SigLIP's has none (its pooling head attends to them)
    skip = 1 if getattr(model.vision_model.embeddings, "class_embedding", None) is not None else 0
    warn_if_batch_dependent(model)
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([model.image_processor(ref.open()) for ref in images[start : start + batch_size]])
            inputs = {"pixel_values": pixels.to(param.device, param.dtype)}
            if isinstance(model, Siglip2MoeModel):  # SigLIP 2 reads patches with their mask and grid
                keys = ("pixel_values", "pixel_attention_mask", "spatial_shapes")
                inputs = dict(zip(keys, patchify(inputs["pixel_values"], model.config.vision_config.patch_size)))
            tower = model.vision_model(**inputs)
            out.append(tower.pooler_output if kind == "pooled" else tower.last_hidden_state[:, skip:].mean(1))
    return torch.cat(out).float().cpu()


def attribute_probe_strength(
    model,
    world: str,
    train_sizes: tuple[int, ...] = (500, 1000, 5000),
    test_size: int = 1000,
    batch_size: int = 256,
    features: str = "embedding",
) -> dict[str, dict]:
    """Per attribute of a generated world: linear probes fitted on the first n evaluation images for each n in
    ``train_sizes``, and an MLP probe on the largest n, all scored on the last ``test_size`` images (the world
    needs ``max(train_sizes) + test_size`` evaluation images), on the image features of one kind
    (``image_features``). Tells absent (no probe reads it) from present but hard to read, which
    ``attribute_probes``' 1,000-image linear probe cannot, and where in the image tower an attribute is."""
    sets = attribute_sets(world)
    n, images = max(train_sizes), len(sets[0][1].targets)
    if n + test_size > images:
        raise ValueError(
            f"{world}: {images} evaluation images, probes need {n} + {test_size}"
            " (generate the world with a larger --eval-size)"
        )
    x = image_features(model, sets[0][1].images, features, batch_size)  # every set: the same images
    test = slice(images - test_size, None)
    out = {}
    for a, data in sets:
        y, k = data.targets, len(a["values"])
        linear = {m: linear_probe_accuracy(x[:m], y[:m], x[test], y[test], k) for m in train_sizes}
        mlp = mlp_probe_accuracy(x[:n], y[:n], x[test], y[test], k)
        out[a["name"]] = {"chance": 100.0 / k, "linear": linear, "mlp": mlp, "mlp_train_size": n}
    return out


@torch.no_grad()
def conditional_zero_shot(
    model, world: str, attributes: tuple[str, ...] = HIDDEN_ATTRIBUTES, max_images: int = 1500, batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """Whether the *text* tower carries an attribute's words. Per attribute, for each evaluation image: a caption
    naming its colour, shape and background correctly, in one variant per value of the attribute and otherwise
    the same words ("a magenta triangle in the upper left on a white background"); ``accuracy``: how often the
    right variant scores highest (chance ``100 / values``); ``variant_cosine``: the mean cosine between the
    variants' text embeddings (near 1: the text tower maps the attribute's words to nothing). Unlike
    ``attribute_probes``' zero-shot, no prompt omits what the caption would otherwise say."""
    sets = {a["name"]: (a["values"], data) for a, data in attribute_sets(world)}  # values: the targets' order
    images = min(max_images, len(sets["color"][1].targets))
    scenes = [{name: values[int(data.targets[i])] for name, (values, data) in sets.items()} for i in range(images)]
    x = encode_images(model, sets["color"][1].images[:images], batch_size=batch_size)
    out = {}
    for name in attributes:
        forms = ATTRIBUTE_BY_NAME[name].forms
        if "adj" in forms:
            template = f"a {{{name}:adj}} {{color:adj}} {{shape:noun}} {{background:pp}}"
        elif "pp" in forms:
            template = f"a {{color:adj}} {{shape:noun}} {{{name}:pp}} {{background:pp}}"
        else:
            template = f"a {{color:adj}} {{shape:noun}} with {{{name}:np}} {{background:pp}}"
        plan = CaptionPlan(template, (0.0,) * len(SLOT_RE.findall(template)))  # every slot's first phrasing
        values = sets[name][0]
        texts = [plan.render({**scene, name: v}) for scene in scenes for v in values]
        t = encode_texts(model, texts, batch_size=batch_size).view(images, len(values), -1)
        truth = torch.tensor([values.index(scene[name]) for scene in scenes])
        accuracy = (torch.einsum("nd,nkd->nk", x, t).argmax(1) == truth).float().mean().item() * 100
        gram = torch.einsum("nkd,njd->nkj", t, t)
        cosine = gram[:, ~torch.eye(len(values), dtype=torch.bool)].mean().item()
        out[name] = {"chance": 100.0 / len(values), "accuracy": accuracy, "variant_cosine": cosine}
    return out


def read_attributes(
    model,
    world: str,
    probe_world: str | None = None,
    probe_train_size: int = 5000,
    probe_test_size: int = 1000,
    batch_size: int = 256,
) -> dict:
    """Every attribute of ``world`` (a generated world's folder): chance, zero-shot and the cross-fitted linear
    probe on its evaluation images; the caption contrast of the hidden attributes (on ``probe_world`` when
    given, else on ``world``); with ``probe_world`` (a world drawn alike, ``probe_train_size +
    probe_test_size`` evaluation images) also the embedding's linear and MLP probes and an MLP probe on the
    mean patch token; and the ``state`` by ``attribute_state``, on the MLP probe where there is one (a
    1,000-image linear probe reads too little to tell suppressed from absent), else on the linear probe."""
    check_worlds(world, probe_world, probe_train_size, probe_test_size)
    rows = attribute_probes(model, world, batch_size)
    if probe_world is not None:
        sizes = (probe_train_size,)
        embedding = attribute_probe_strength(model, probe_world, sizes, probe_test_size, batch_size)
        patches = attribute_probe_strength(model, probe_world, sizes, probe_test_size, batch_size, "patch_mean")
        for name, row in rows.items():
            row["embedding_linear"] = embedding[name]["linear"][probe_train_size]
            row["embedding_mlp"] = embedding[name]["mlp"]
            row["patch_mean_mlp"] = patches[name]["mlp"]
    varied = tuple(a for a in HIDDEN_ATTRIBUTES if a in rows)
    for name, r in conditional_zero_shot(model, probe_world or world, varied, batch_size=batch_size).items():
        rows[name]["conditional"] = r["accuracy"]
        rows[name]["variant_cosine"] = r["variant_cosine"]
    probe = "embedding_mlp" if probe_world is not None else "linear_probe"
    for row in rows.values():
        row["state"] = attribute_state(row["chance"], row["zero_shot"], row[probe])
    images = read_manifest(world)["config"]["eval_size"]  # every attribute's set holds every evaluation image
    return {
        "world": str(world),
        "images": images,
        "zero_shot_standard_error": 50.0 / images**0.5,  # the largest, at 50% accuracy
        "probe_world": probe_world and str(probe_world),
        "probe_train_size": probe_train_size if probe_world is not None else None,
        "state_from": probe,
        "attributes": rows,
    }


def format_attributes(result: dict) -> str:
    """``read_attributes``' result as a Markdown table, one row per attribute."""
    rows = result["attributes"]
    columns = [("chance", "chance"), ("majority", "constant answer")]
    columns += [("zero_shot", "zero-shot"), ("linear_probe", "linear probe")]
    columns += [
        (key, title)
        for key, title in [
            ("embedding_linear", "embedding linear"),
            ("embedding_mlp", "embedding MLP"),
            ("patch_mean_mlp", "patch tokens MLP"),
            ("conditional", "conditional"),
            ("variant_cosine", "variant cosine"),
        ]
        if any(key in row for row in rows.values())
    ]
    lines = ["| attribute | " + " | ".join(t for _, t in columns) + " | state |"]
    lines.append("|" + "---|" * (len(columns) + 2))
    for name, row in rows.items():
        cells = [_cell(row, k) for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['state']} |")
    error = result["zero_shot_standard_error"]
    probe = (
        f"the embedding's MLP probe on {result['probe_train_size']} images of {result['probe_world']}"
        if result["state_from"] == "embedding_mlp"
        else "the linear probe (too weak to tell suppressed from absent: give --probe-world)"
    )
    lines.append(
        f"\nZero-shot and linear probe on {result['images']} evaluation images of {result['world']} (standard error"
        f" up to {error:.1f} points); states from {probe}."
    )

    def unbalanced_bar(chance: float) -> float:  # half the states' bar, or two standard errors of a value's share
        return max(ABOVE_CHANCE / 2, 2 * 100 * (chance / 100 * (1 - chance / 100) / result["images"]) ** 0.5)

    unbalanced = [n for n, r in rows.items() if r["majority"] >= r["chance"] + unbalanced_bar(r["chance"])]
    if unbalanced:
        lines.append(
            f"Unbalanced on these images: {', '.join(unbalanced)} (the best constant answer scores well above "
            "chance); the states read against chance, as designed: compare the zero-shot with the constant answer."
        )
    if error > ABOVE_CHANCE / 2:  # the states' 5-point bar is then within two standard errors of chance
        lines.append(
            f"Too few images for the states' {ABOVE_CHANCE:.0f}-point bar: generate the world with a larger --eval-size."
        )
    return "\n".join(lines)


def _cell(row: dict, key: str) -> str:
    if key not in row:  # the caption contrast varies the hidden attributes only
        return ""
    return f"{row[key]:.4f}" if key == "variant_cosine" else f"{row[key]:.1f}"
