"""The generated world's attributes and the language that describes them.

Each attribute has values, the keywords that name each value in text (the first one is the class name), and
phrasings in a few grammatical *forms* (adjective, predicate, prepositional phrase, ...). A caption template
is text with ``{attribute:form}`` slots; a caption is a template rendered with one random choice per slot.
Keeping those choices (``CaptionPlan``) lets a caption be rendered again with one value changed and every
other word the same, which is what MMVP pairs and swap probes need.

Keywords never share a word across attributes (``red`` is only a colour, ``small`` only a size), so the
attributes a caption mentions can be read back from its words (the manifest lists them; the tests read every
caption back this way).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Same split as HF ``tokenizers``' ``Whitespace`` pre-tokenizer: runs of word characters or of punctuation.
WORD_RE = re.compile(r"\w+|[^\w\s]+")
SLOT_RE = re.compile(r"\{(\w+):(\w+)\}")
# The MMVP-VLM scorer prefixes every statement with this prompt, so its words belong to the vocabulary.
MMVP_PROMPT = "a photo of "


@dataclass(frozen=True)
class Attribute:
    """One independent visual attribute: its values, their keywords and phrasings per grammatical form."""

    name: str
    difficulty: str  # "easy" | "moderate" | "hard": how readable it is from pixels
    values: tuple[str, ...]
    keywords: Mapping[str, tuple[str, ...]]  # value -> phrases that name it; [0] is the class name
    forms: Mapping[str, Mapping[str, tuple[str, ...]]]  # form -> value -> phrasings

    @property
    def classnames(self) -> list[str]:
        return [self.keywords[v][0] for v in self.values]


def _framed(frames: Sequence[str], keywords: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Every frame (with ``{v}``) filled with every keyword of each value."""
    return {v: tuple(f.format(v=w) for f in frames for w in words) for v, words in keywords.items()}


def _attribute(name: str, difficulty: str, keywords: dict[str, tuple[str, ...]], forms: dict) -> Attribute:
    """Forms given as frames (``"in the {v}"``) are filled with every keyword; dicts are taken as they are."""
    resolved = {form: spec if isinstance(spec, dict) else _framed(spec, keywords) for form, spec in forms.items()}
    return Attribute(name, difficulty, tuple(keywords), keywords, resolved)


def _single(*values: str) -> dict[str, tuple[str, ...]]:
    return {v: (v,) for v in values}


_COLOR = _single("red", "orange", "yellow", "lime", "green", "cyan", "blue", "purple", "magenta", "pink")
_BACKGROUND = {
    **_single("white"),
    "gray": ("gray", "grey"),
    **_single("black", "brown", "navy", "olive", "teal", "beige"),
}
_POSITION = {
    "upper left": ("upper left", "top left"),
    "upper right": ("upper right", "top right"),
    "lower left": ("lower left", "bottom left"),
    "lower right": ("lower right", "bottom right"),
}
_TEXTURE = {
    "solid": ("solid",),
    "striped": ("striped", "stripes"),
    "checkered": ("checkered", "checks"),
    "hollow": ("hollow", "outlined", "outline"),
}
_COUNT = {"one": ("one dot", "single dot"), "two": ("two dots",), "three": ("three dots",)}

# Order is the order of the manifest and of the per-sample random draws; changing it changes every world.
ATTRIBUTES: tuple[Attribute, ...] = (
    _attribute("color", "easy", _COLOR, {"adj": ("{v}",), "pred": ("{v}", "coloured {v}")}),
    _attribute(
        "background",
        "easy",
        _BACKGROUND,
        {"pp": ("on a {v} background", "against a {v} background", "over a {v} background"), "bare": ("{v}",)},
    ),
    _attribute(
        "shape", "moderate", _single("circle", "square", "triangle", "star", "cross", "diamond"), {"noun": ("{v}",)}
    ),
    _attribute(
        "size",
        "moderate",
        _single("small", "medium", "large"),
        {"adj": ("{v}", "{v}-sized"), "pred": ("{v}", "{v}-sized", "of {v} size")},
    ),
    _attribute("position", "moderate", _POSITION, {"pp": ("in the {v}", "in the {v} corner", "at the {v}")}),
    _attribute(
        "texture",
        "hard",
        _TEXTURE,
        {
            "adj": {
                "solid": ("solid",),
                "striped": ("striped",),
                "checkered": ("checkered",),
                "hollow": _TEXTURE["hollow"][:2],
            },
            "pp": {
                "solid": ("with a solid fill",),
                "striped": ("with stripes",),
                "checkered": ("with checks", "with a checkered pattern"),
                "hollow": ("with only an outline", "drawn as an outline"),
            },
        },
    ),
    _attribute(
        "count",
        "hard",
        _COUNT,
        {"np": {"one": ("one dot", "a single dot"), "two": ("two dots",), "three": ("three dots",)}},
    ),
)
ATTRIBUTE_BY_NAME: dict[str, Attribute] = {a.name: a for a in ATTRIBUTES}

# Short captions are web alt-text: the easy attributes and the object's name (one moderate attribute). The
# base CLIP is pretrained on these, so size, position, texture and count never reach its loss.
SHORT_ATTRIBUTES = ("color", "background", "shape")

SHORT_TRAIN_TEMPLATES = (
    "a {color:adj} {shape:noun} {background:pp}",
    "{color:adj} {shape:noun} on {background:bare}",
    "a photo of a {color:adj} {shape:noun}, {background:bare} background",
    "{background:bare} background with a {color:adj} {shape:noun}",
    "a {color:adj} {shape:noun} shape {background:pp}",
)
# Held-out evaluation templates: new sentence structures made only of words the training templates use,
# so a model is tested on composition, not on words it never saw.
SHORT_EVAL_TEMPLATES = (
    "a {color:adj} {shape:noun} with a {background:bare} background",
    "{background:bare} background, a {color:adj} {shape:noun}",
    "a photo of a {color:adj} {shape:noun} shape on {background:bare}",
)
DETAILED_TRAIN_TEMPLATES = (
    "a {size:adj} {texture:adj} {color:adj} {shape:noun} {position:pp} {background:pp}, with {count:np}.",
    "a {color:adj} {shape:noun} {texture:pp}; it is {size:pred} and sits {position:pp}, with {count:np}, "
    "{background:pp}.",
    "{background:pp}: a {size:adj} {color:adj} {texture:adj} {shape:noun} {position:pp} and {count:np}.",
    "a photo of a {texture:adj} {shape:noun} {position:pp}. the {shape:noun} is {size:pred} and {color:pred}, "
    "with {count:np} {background:pp}.",
    "a {size:adj} {shape:noun}, {color:pred} and {texture:adj}, {position:pp} {background:pp}, next to {count:np}.",
    "{count:np} and a {size:adj} {color:adj} {shape:noun} shape {texture:pp}, {position:pp}, {background:pp}.",
)
DETAILED_EVAL_TEMPLATES = (
    "{count:np} and a {color:adj} {shape:noun} {texture:pp} {background:pp}; the {shape:noun} is {size:pred}, "
    "{position:pp}.",
    "{position:pp}, a {size:adj} {color:adj} {shape:noun} {texture:pp}, with {count:np}, {background:pp}.",
    "the {shape:noun} is {color:pred}, {texture:adj} and {size:pred}; it sits {position:pp} {background:pp} "
    "with {count:np}.",
    "{background:pp}, {count:np} and a {texture:adj} {shape:noun}, {size:pred} and {color:pred}, {position:pp}.",
)

# Zero-shot classification prompts per attribute (CLIP_benchmark ``{c}`` placeholder). They use the short
# captions' words where they can, so a model pretrained on short captions is not handed unseen words, and
# never put "a" before a class name that could start with a vowel ("orange", "olive").
CLASSIFICATION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("{c} shape", "{c}", "a photo of {c}"),
    "background": ("{c} background", "a shape on {c}", "a photo of a shape, {c} background"),
    "shape": ("a {c}", "a photo of a {c}", "a {c} shape"),
    "size": ("a {c} shape", "a photo of a {c} shape", "a {c}-sized shape"),
    "position": ("a shape in the {c}", "a shape in the {c} corner", "a photo of a shape at the {c}"),
    "texture": ("a {c} shape", "a photo of a {c} shape"),
    "count": ("a shape with {c}", "a photo of a shape with {c}"),
}


def words(text: str) -> list[str]:
    """``text`` split as the word tokenizer splits it (lowercase)."""
    return WORD_RE.findall(text.lower())


@dataclass(frozen=True)
class CaptionPlan:
    """A template and one uniform number per slot: renders the same phrasing for any attribute values."""

    template: str
    picks: tuple[float, ...]

    @classmethod
    def sample(cls, template: str, rng: np.random.Generator) -> CaptionPlan:
        return cls(template, tuple(float(u) for u in rng.random(len(SLOT_RE.findall(template)))))

    def render(self, attributes: Mapping[str, str]) -> str:
        picks = iter(self.picks)

        def fill(m: re.Match) -> str:
            options = ATTRIBUTE_BY_NAME[m.group(1)].forms[m.group(2)][attributes[m.group(1)]]
            return options[int(next(picks) * len(options))]

        return _finish(SLOT_RE.sub(fill, self.template))


def _finish(text: str) -> str:
    """English surface fixes: ``a`` -> ``an`` before a vowel, capitalised sentence starts."""
    text = re.sub(r"\b([aA]) (?=[aeiou])", r"\1n ", text)
    return re.sub(r"(^|\. )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def sample_captions(templates: Sequence[str], count: int, rng: np.random.Generator) -> list[CaptionPlan]:
    """``count`` plans on distinct templates (so several captions of one image are phrased differently)."""
    chosen = rng.choice(len(templates), size=count, replace=False)
    return [CaptionPlan.sample(templates[i], rng) for i in chosen]


def vocabulary() -> list[str]:
    """Every word a caption, template, class name or prompt of the world can contain (sorted, lowercase)."""
    texts: list[str] = [MMVP_PROMPT, "an", *WEB_PREFIXES, *WEB_FILLERS, *WEB_NOUNS, *WEB_SEPARATORS, "with background"]
    for template in SHORT_TRAIN_TEMPLATES + SHORT_EVAL_TEMPLATES + DETAILED_TRAIN_TEMPLATES + DETAILED_EVAL_TEMPLATES:
        texts.append(SLOT_RE.sub(" ", template))
    for attr in ATTRIBUTES:
        texts += [p for phrases in attr.keywords.values() for p in phrases]
        texts += [p for per_value in attr.forms.values() for phrases in per_value.values() for p in phrases]
        texts += [t.replace("{c}", " ") for t in CLASSIFICATION_TEMPLATES[attr.name]]
    return sorted({w for t in texts for w in words(t)})


# ---------------------------------------------------------------------------------------- web alt-text
# The broad pretraining corpus (issue: a base pretrained like a web CLIP). Web alt-text names what covers
# the picture almost always (the object, its colour, the backdrop) and everything else rarely; word order,
# length and filler vary wildly. The rare mentions are what make the base *suppress* size, position, texture
# and count (weak signal, learned a little) rather than never see them, and the filler makes captions as long
# as the detailed ones, so every text position the fine-tuning phases use is trained during pretraining.
WEB_MENTION_RATE: dict[str, float] = {
    "color": 0.9,
    "background": 0.8,
    "shape": 0.95,
    "size": 0.1,
    "position": 0.1,
    "texture": 0.1,
    "count": 0.1,
}
WEB_PREFIXES = ("a photo of", "image of", "picture of", "close up of", "an illustration of", "stock image :", "view of")
# Filler never contains an attribute keyword, so what a web caption names can still be read back from its words.
WEB_FILLERS = (
    "stock photo",
    "high quality",
    "hd wallpaper",
    "free download",
    "vector illustration",
    "clipart",
    "simple flat icon",
    "royalty free image",
    "digital art",
    "for sale",
    "new design",
    "best price",
    "graphic element",
    "jpg",
    "png",
    "# art",
    "| sticker",
    "cute minimal poster",
    "abstract print",
    "template for web",
    "isolated object",
    "by an unknown artist",
    "from our shop",
    "download now",
)
WEB_NOUNS = ("shape", "object", "figure")  # when the caption does not name the shape
WEB_SEPARATORS = (" ", ", ", " - ", " | ")
WEB_MAX_FILLERS = 8


def web_caption(
    attributes: Mapping[str, str], rng: np.random.Generator, rates: Mapping[str, float] = WEB_MENTION_RATE
) -> tuple[str, list[str]]:
    """A web alt-text caption of a scene and the attributes it names (each drawn with its rate in ``rates``)."""
    named = [a.name for a in ATTRIBUTES if rng.random() < rates[a.name]]

    def phrase(attribute: str, form: str) -> str:
        options = ATTRIBUTE_BY_NAME[attribute].forms[form][attributes[attribute]]
        return options[rng.integers(len(options))]

    adjectives = [phrase(a, "adj") for a in ("size", "texture", "color") if a in named]
    rng.shuffle(adjectives)
    noun = phrase("shape", "noun") if "shape" in named else WEB_NOUNS[rng.integers(len(WEB_NOUNS))]
    clauses = []
    if "background" in named:
        clauses.append(
            phrase("background", "pp") if rng.random() < 0.6 else phrase("background", "bare") + " background"
        )
    if "position" in named:
        clauses.append(phrase("position", "pp"))
    if "count" in named:
        clauses.append(("with " if rng.random() < 0.5 else "") + phrase("count", "np"))
    rng.shuffle(clauses)
    parts = [" ".join([*adjectives, noun])]
    for clause in clauses:  # each clause goes before or after the object, so word order varies
        parts.insert(0, clause) if rng.random() < 0.3 else parts.append(clause)
    text = WEB_SEPARATORS[rng.integers(2)].join(parts)
    if rng.random() < 0.5:
        text = f"{WEB_PREFIXES[rng.integers(len(WEB_PREFIXES))]} {text}"
    for _ in range(rng.integers(WEB_MAX_FILLERS + 1)):
        filler = WEB_FILLERS[rng.integers(len(WEB_FILLERS))]
        sep = WEB_SEPARATORS[rng.integers(len(WEB_SEPARATORS))]
        text = f"{text}{sep}{filler}" if rng.random() < 0.8 else f"{filler}{sep}{text}"
    return _finish(text), named
