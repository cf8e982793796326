"""Caption wording and the closed vocabulary of the world.

Two corpora word their images differently, as WIT (CLIP's pretraining data) and CC3M (ARF's retrieval pool)
do. `describe` is the pretraining corpus's alt-text: every caption names the class, count and style and,
often, colour, size, position and background (see `MENTION_PROB`); the wording varies (synonyms, word order,
six sentence templates), so a text tower has to learn what the words mean rather than where they sit.
`describe_web` is the pool's: the style often unsaid, the class often replaced by its hypernym
("an animal"), some captions only partial ("a sketch on a dotted green background") and some wrong.
`vocabulary()` lists every word a caption or a class prompt can contain; the world's text tower tokenizes
at word level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from anchor_clip.world.scene import BACKGROUNDS, COLOURS, SIZES, STYLES, Scene
from anchor_clip.world.shapes import SHAPE_NAMES

#: Zero-shot prompts: the plain class prompt (FLYP's finetuning text) and one per style.
CLASS_PROMPT = "a photo of a {c}."
STYLE_PROMPT = "a {style} of a {c}."

_IRREGULAR_PLURALS = {"fish": "fish", "leaf": "leaves", "cactus": "cacti", "snowman": "snowmen",
                      "furniture": "furniture", "clothing": "clothing"}

#: The word a web caption may use instead of the class name, as alt-text says "a dog" for a beagle.
HYPERNYMS: dict[str, str] = {
    **dict.fromkeys(("circle", "square", "triangle", "diamond", "semicircle", "hexagon", "pentagon", "octagon",
                     "trapezoid", "ring", "cross", "star", "heart"), "shape"),
    **dict.fromkeys(("fish", "cat", "bird"), "animal"),
    **dict.fromkeys(("tree", "flower", "leaf", "mushroom", "cactus"), "plant"),
    **dict.fromkeys(("key", "hammer", "pencil", "lock", "ladder", "gear"), "tool"),
    **dict.fromkeys(("car", "boat", "rocket"), "vehicle"),
    **dict.fromkeys(("chair", "table"), "furniture"),
    **dict.fromkeys(("mug", "bottle"), "container"),
    **dict.fromkeys(("cloud", "drop", "sun", "moon", "bolt"), "symbol"),
    **dict.fromkeys(("shirt", "crown"), "clothing"),
    **dict.fromkeys(("house",), "building"),
}
DEFAULT_HYPERNYM = "object"  # classes without a closer one (bell, umbrella, balloon, ...)

STYLE_NOUNS: dict[str, tuple[str, ...]] = {
    "photo": ("photo", "close-up photo", "real photo"),
    "sketch": ("sketch", "pencil sketch", "rough sketch"),
    "cartoon": ("cartoon", "cartoon drawing", "simple cartoon"),
    "painting": ("painting", "oil painting", "watercolor painting"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "big": ("big", "large", "huge"),
}
COUNT_WORDS: dict[int, tuple[str, ...]] = {1: ("a", "one"), 2: ("two", "a pair of"), 3: ("three", "a group of three")}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid"),
    "striped": ("striped",),
    "dotted": ("dotted", "polka-dot"),
    "checkered": ("checkered", "checkerboard"),
    "wavy": ("wavy",),
}
BACKGROUND_PHRASES = ("on a {pattern} {colour} background", "against a {pattern} {colour} background",
                      "in front of a {pattern} {colour} background")
#: Position phrases per (arrangement, position) of `scene.Scene`.
POSITION_WORDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("single", "top left"): ("at the top left", "in the top left corner", "in the upper left"),
    ("single", "top"): ("at the top", "near the top", "in the upper middle"),
    ("single", "top right"): ("at the top right", "in the top right corner", "in the upper right"),
    ("single", "left"): ("on the left", "on the left side", "at the left"),
    ("single", "center"): ("in the center", "in the middle"),
    ("single", "right"): ("on the right", "on the right side", "at the right"),
    ("single", "bottom left"): ("at the bottom left", "in the bottom left corner", "in the lower left"),
    ("single", "bottom"): ("at the bottom", "near the bottom", "in the lower middle"),
    ("single", "bottom right"): ("at the bottom right", "in the bottom right corner", "in the lower right"),
    ("row", "top"): ("in a row at the top", "side by side along the top"),
    ("row", "center"): ("in a row across the middle", "side by side in the middle"),
    ("row", "bottom"): ("in a row at the bottom", "side by side along the bottom"),
    ("column", "left"): ("in a column on the left", "stacked on the left"),
    ("column", "center"): ("in a column in the middle", "stacked in the center"),
    ("column", "right"): ("in a column on the right", "stacked on the right"),
}
#: Sentence templates over the parts `describe` fills in; each has a slot for every attribute, empty when unsaid.
TEMPLATES = (
    "{a_style} of {objects} {where} {background}.",
    "{style}: {objects} {where} {background}.",
    "{objects} {where} {background}, {as_style}.",
    "{a_background} with {objects} {where}, {style}.",
    "in this {style}, {objects} {be} {where} {background}.",
    "{a_style} showing {objects} {where} {background}.",
)
#: Web captions often leave the style unsaid.
WEB_TEMPLATES = (
    "{objects} {where} {background}.",
    "{a_background} with {objects} {where}.",
    "{objects} {be} {where} {background}.",
)
#: Web captions that never name the object: what a caption says of an image it does not describe well.
PARTIAL_TEMPLATES = (
    "{a_style} {background}.",
    "something {colour} {where}.",
    "{a_background}.",
)
AS_STYLE = ("in {a_style}", "as {a_style}")
#: Parts a template cannot do without.
_NEEDS = {TEMPLATES[3]: ("background",), TEMPLATES[4]: ("where",), WEB_TEMPLATES[2]: ("where",),
          PARTIAL_TEMPLATES[0]: ("background",), PARTIAL_TEMPLATES[1]: ("where",)}
#: How often a caption mentions each optional attribute. Like alt-text, a caption always names the object,
#: its count and the style but only sometimes the rest: were every attribute always named, colours, position
#: and background alone would tell a batch's captions apart, and a CLIP trained on them matches pairs without
#: learning the shapes. Measured with a small world_clip, batch 256: with every attribute named, in-batch loss
#: 0.06 but 8% zero-shot accuracy on the 20 ID classes after 1100 steps; with these rates, 67% after 1000.
MENTION_PROB: dict[str, float] = {"colour": 0.5, "size": 0.3, "position": 0.3, "background": 0.3}


def words(text: str) -> list[str]:
    """Lowercase word tokens of a text; punctuation and hyphens separate words ("close-up" -> close, up)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def plural(noun: str) -> str:
    """English plural of a class name."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "sh", "ch", "x", "z")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def hypernym(shape: str) -> str:
    return HYPERNYMS.get(shape, DEFAULT_HYPERNYM)


def describe(scene: Scene, rng: np.random.Generator, name: str | None = None,
             templates: tuple[str, ...] = TEMPLATES) -> str:
    """A caption of the scene: a random template, random synonyms, optional attributes per `MENTION_PROB`.

    Args:
        name: the word for the object (default: the class name).
        templates: the sentence templates to draw from.

    Example: "a pencil sketch of two small red stars in a row at the top on a dotted green background."
    """
    mention = {attribute: rng.random() < p for attribute, p in MENTION_PROB.items()}
    name = name or scene.shape
    noun = name if scene.count == 1 else plural(name)
    count = _pick(rng, COUNT_WORDS[scene.count])
    size = _pick(rng, SIZE_WORDS[scene.size])
    described = [word for word, keep in ((size, mention["size"]), (scene.colour, mention["colour"])) if keep]
    objects = " ".join([count, *described, noun])
    if count == "a":  # the article must agree with the word that follows it
        objects = _article(objects[2:])
    style = _pick(rng, STYLE_NOUNS[scene.style])
    pattern = _pick(rng, BACKGROUND_WORDS[scene.background])
    where = _pick(rng, POSITION_WORDS[(scene.arrangement, scene.position)])
    background = _pick(rng, BACKGROUND_PHRASES).format(pattern=pattern, colour=scene.background_colour)
    parts = {
        "objects": objects,
        "where": where if mention["position"] else "",
        "background": background if mention["background"] else "",
        "a_background": _article(f"{pattern} {scene.background_colour} background"),
        "style": style,
        "a_style": _article(style),
        "as_style": _pick(rng, AS_STYLE).format(a_style=_article(style)),
        "be": "is" if scene.count == 1 else "are",
        "colour": scene.colour,
    }
    # templates whose sentence needs a part that is left out ("... with a star, sketch" needs a background)
    usable = [t for t in templates if all(parts[need] for need in _NEEDS.get(t, ()))] or list(templates)
    caption = _pick(rng, usable).format(**parts)
    return re.sub(r" +([,.])", r"\1", re.sub(r" {2,}", " ", caption)).strip()  # close the gaps of left-out parts


@dataclass(frozen=True)
class WebCaptions:
    """How the retrieval pool's captions depart from the pretraining corpus's (shares of all pool captions)."""

    wrong: float = 0.1  # describe another concept of the pool: web pairs that do not match
    partial: float = 0.1  # never name the object (`PARTIAL_TEMPLATES`)
    hypernym: float = 0.2  # name the object by its hypernym ("a red animal")
    style: float = 0.5  # of the rest, the share that names the style (the others use `WEB_TEMPLATES`)

    def __post_init__(self) -> None:
        shares = {"wrong": self.wrong, "partial": self.partial, "hypernym": self.hypernym, "style": self.style}
        bad = [f"{k}={v}" for k, v in shares.items() if not 0.0 <= v <= 1.0]
        if bad or self.wrong + self.partial + self.hypernym > 1.0:
            raise ValueError(f"WebCaptions shares must lie in [0, 1] and wrong + partial + hypernym <= 1; got {shares}")


def describe_web(scene: Scene, rng: np.random.Generator, concepts: tuple[str, ...],
                 noise: WebCaptions = WebCaptions()) -> str:
    """A retrieval-pool caption: like `describe`, but wrong, partial, hypernym-only or style-less at `noise`'s rates.

    Args:
        concepts: every class name of the pool; a wrong caption names another one of them.
    """
    kind = rng.random()
    templates = TEMPLATES if rng.random() < noise.style else WEB_TEMPLATES
    if kind < noise.wrong:
        other = _pick(rng, [c for c in concepts if c != scene.shape])
        return describe(replace(scene, shape=other), rng, templates=templates)
    if kind < noise.wrong + noise.partial:
        return describe(scene, rng, templates=PARTIAL_TEMPLATES)
    if kind < noise.wrong + noise.partial + noise.hypernym:
        return describe(scene, rng, name=hypernym(scene.shape), templates=templates)
    return describe(scene, rng, templates=templates)


def class_prompts(classnames: list[str], style: str | None = None) -> list[str]:
    """One zero-shot prompt per class: `CLASS_PROMPT`, or `STYLE_PROMPT` for a given style."""
    if style is None:
        return [CLASS_PROMPT.format(c=c) for c in classnames]
    return [STYLE_PROMPT.format(style=style, c=c) for c in classnames]


def vocabulary() -> list[str]:
    """Every word a caption or class prompt of the world can contain, sorted (the text tower's word list)."""
    phrases: list[str] = [CLASS_PROMPT, STYLE_PROMPT, *TEMPLATES, *WEB_TEMPLATES, *PARTIAL_TEMPLATES, *AS_STYLE,
                          *BACKGROUND_PHRASES, "an is are"]
    names = [*SHAPE_NAMES, *sorted(set(HYPERNYMS.values())), DEFAULT_HYPERNYM]
    phrases += names + [plural(name) for name in names]
    phrases += list(STYLES) + list(COLOURS) + list(SIZES) + list(BACKGROUNDS)
    for table in (STYLE_NOUNS, SIZE_WORDS, COUNT_WORDS, BACKGROUND_WORDS, POSITION_WORDS):
        phrases += [option for options in table.values() for option in options]
    # template placeholders ({a_style}, ...) are field names, not words a caption can contain
    text = re.sub(r"\{[a-z_]+\}", " ", " ".join(phrases))
    return sorted(set(words(text)))


def attribute_words(caption: str) -> set[str]:
    """The attribute words a caption uses (colours, sizes, background patterns, positions; not class or style).

    What `attribute_recall` compares: how much of an image's true description a generated caption keeps.
    """
    attribute_vocab = set(COLOURS) | {w for table in (SIZE_WORDS, BACKGROUND_WORDS, POSITION_WORDS)
                                      for options in table.values() for o in options for w in words(o)}
    attribute_vocab -= {"a", "at", "the", "in", "on", "of", "side", "by"}  # glue words of the position phrases
    return set(words(caption)) & attribute_vocab


def attribute_recall(generated: list[str], oracle: list[str]) -> float:
    """Mean share of each oracle caption's attribute words that its generated caption also uses."""
    shares = [len(attribute_words(g) & truth) / len(truth)
              for g, o in zip(generated, oracle, strict=True) if (truth := attribute_words(o))]
    return float(np.mean(shares)) if shares else float("nan")
