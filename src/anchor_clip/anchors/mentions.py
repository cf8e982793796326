"""Which class names a caption mentions: the kNN captioner's label filter and the caption report share it.

Matching is on whole words, case-insensitive and tolerant of regular plurals, so "two red stars" names the
class "star" and "starfish" does not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache


def _words(text: str) -> list[str]:
    """Lower-case words; underscores, hyphens and punctuation separate them ("great_white_shark" -> 3 words)."""
    return re.findall(r"[^\W_]+", text.lower())


def _forms(words: tuple[str, ...]) -> list[tuple[str, ...]]:
    """A name and the regular plurals of its last word (s, es, consonant + y -> ies)."""
    *head, last = words
    lasts = [last, last + "s", last + "es"]
    if len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        lasts.append(last[:-1] + "ies")  # butterfly -> butterflies
    return [(*head, form) for form in lasts]


class ClassNameMatcher:
    """Finds the class names a text mentions: whole words, case-insensitive, tolerant of regular plurals.

    Names are looked up as word n-grams in a dict, so the cost per text does not grow with the number of
    classes (a 1000-way regex alternation would, and ImageNet-size jobs check a million captions). Matching
    is longest-first from left to right, so "great white shark" in a caption is that class and not also
    "shark". Irregular plurals (mouse/mice) are not covered.

    Args:
        names: class names; `find` returns indices into this list.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.keys = [tuple(_words(name)) for name in names]
        self.forms: dict[tuple[str, ...], set[int]] = {}
        for i, (name, key) in enumerate(zip(names, self.keys, strict=True)):
            if not key:
                raise ValueError(f"class name {name!r} (index {i}) has no words to match")
            for form in _forms(key):
                self.forms.setdefault(form, set()).add(i)
        self.max_words = max(len(key) for key in self.forms)

    def find(self, text: str) -> set[int]:
        """Indices of the names mentioned in `text` (several when names repeat, as ImageNet's two "crane"s)."""
        words, found, start = _words(text), set(), 0
        while start < len(words):
            for n in range(min(self.max_words, len(words) - start), 0, -1):
                hit = self.forms.get(tuple(words[start : start + n]))
                if hit:
                    found |= hit
                    start += n
                    break
            else:
                start += 1
        return found


@lru_cache(maxsize=4096)
def _matcher(name: str) -> ClassNameMatcher:
    return ClassNameMatcher([name])


def mentions(caption: str, name: str) -> bool:
    """Whether `caption` names the class `name` (whole words, case-insensitive, plural-tolerant)."""
    return bool(_matcher(name).find(caption))


def first_consistent(candidates: Sequence[Sequence[str]], label_names: Sequence[str]) -> tuple[list[int], list[bool]]:
    """For each image, the rank of the first candidate caption that names the image's class.

    Args:
        candidates: per image, its neighbours' captions, nearest first.
        label_names: per image, the name of its known class.

    Returns:
        ranks: index into each candidate list (0 where none matches: fall back to the nearest);
        found: whether a matching caption was found.
    """
    ranks, found = [], []
    for captions, name in zip(candidates, label_names, strict=True):
        rank = next((i for i, caption in enumerate(captions) if mentions(caption, name)), None)
        ranks.append(0 if rank is None else rank)
        found.append(rank is not None)
    return ranks, found


def mention_rates(
    captions: Sequence[str],
    labels: Sequence[int],
    classnames: Sequence[str],
    other_classnames: Sequence[str] | None = None,
) -> dict[str, float]:
    """How often captions name their image's class, another finetune class, or a class outside the finetune set.

    The last one is what hurts zero-shot accuracy: such captions pull unseen-class texts onto finetune images.

    Args:
        captions: one per image.
        labels: per image, its index into `classnames`.
        classnames: the finetune class names.
        other_classnames: names of classes outside the finetune set; names equal to a finetune class are ignored.

    Returns:
        Fractions of captions: `names_own_class`, `names_other_finetune_class`, and `names_unseen_class` when
        `other_classnames` are given.
    """
    finetune_keys = {tuple(_words(name)) for name in classnames}
    unseen = [name for name in other_classnames or [] if tuple(_words(name)) not in finetune_keys]
    matcher = ClassNameMatcher([*classnames, *unseen])
    own = other = outside = 0
    for caption, label in zip(captions, labels, strict=True):
        found = matcher.find(caption)
        own += label in found
        # Compare names, not indices: a name listed twice (ImageNet's two "crane"s) is not another class.
        other += any(i < len(classnames) and matcher.keys[i] != matcher.keys[label] for i in found)
        outside += any(i >= len(classnames) for i in found)
    n = len(captions)
    rates = {"names_own_class": own / n, "names_other_finetune_class": other / n}
    if other_classnames:
        rates["names_unseen_class"] = outside / n
    return rates

