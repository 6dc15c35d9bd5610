"""The built-in demo pool: a deterministic instruction dataset with known structure, written by this project.

``hf-dataselect`` needs a real pool to run on without the network, so this module generates one: 14 task
families (arithmetic, unit conversion, string edits, list operations, dates, sentiment, capitals, vocabulary,
translation, code, definitions, e-mails, recipes, advice), several phrasings each, with answers computed from the
question. Two kinds of flaws are planted so that a selection's effect is visible:

* **near-duplicates** — copies of other rows with cosmetic edits (case, whitespace, punctuation, a polite
  prefix); ``is_near_duplicate`` marks them;
* **low-quality answers** — wrong, empty-ish, truncated or off-topic responses; ``is_low_quality`` marks them.

Columns: ``id``, ``instruction``, ``input``, ``output`` (Alpaca format), ``rating`` (a noisy 1–10 quality
rating, as many real datasets ship: lower for the low-quality rows, but not a perfect signal), and the hidden
labels ``task`` (``family/phrasing``), ``family``, ``is_near_duplicate``, ``is_low_quality``. Selectors never see
the labels unless told to use a column; ``hf-dataselect compare --label-column family`` scores against them.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset

DEMO_ROWS = 3000
NEAR_DUPLICATE_SHARE = 0.08
LOW_QUALITY_SHARE = 0.10


@dataclass(frozen=True)
class Example:
    phrasing: int
    instruction: str
    input: str
    output: str


Generator = Callable[[np.random.Generator], Example]


# -- vocabulary ------------------------------------------------------------------------------------------
_CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Kenya": "Nairobi",
    "Canada": "Ottawa",
    "Brazil": "Brasília",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Norway": "Oslo",
    "Peru": "Lima",
    "Vietnam": "Hanoi",
    "Germany": "Berlin",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Spain": "Madrid",
    "Chile": "Santiago",
    "Ghana": "Accra",
    "Poland": "Warsaw",
    "Thailand": "Bangkok",
    "Turkey": "Ankara",
    "Portugal": "Lisbon",
    "Argentina": "Buenos Aires",
    "Morocco": "Rabat",
    "Finland": "Helsinki",
    "Ireland": "Dublin",
    "Nepal": "Kathmandu",
    "Cuba": "Havana",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Senegal": "Dakar",
    "Colombia": "Bogotá",
}
_TRANSLATIONS = {  # English -> (French, Spanish, German)
    "house": ("maison", "casa", "Haus"),
    "water": ("eau", "agua", "Wasser"),
    "book": ("livre", "libro", "Buch"),
    "friend": ("ami", "amigo", "Freund"),
    "city": ("ville", "ciudad", "Stadt"),
    "tree": ("arbre", "árbol", "Baum"),
    "bread": ("pain", "pan", "Brot"),
    "sun": ("soleil", "sol", "Sonne"),
    "night": ("nuit", "noche", "Nacht"),
    "dog": ("chien", "perro", "Hund"),
    "school": ("école", "escuela", "Schule"),
    "sea": ("mer", "mar", "Meer"),
    "window": ("fenêtre", "ventana", "Fenster"),
    "apple": ("pomme", "manzana", "Apfel"),
    "train": ("train", "tren", "Zug"),
    "flower": ("fleur", "flor", "Blume"),
}
_LANGUAGES = ("French", "Spanish", "German")
_SYNONYMS = {
    "happy": ("joyful", "sad"),
    "big": ("large", "small"),
    "fast": ("quick", "slow"),
    "begin": ("start", "end"),
    "smart": ("clever", "foolish"),
    "brave": ("courageous", "cowardly"),
    "easy": ("simple", "difficult"),
    "rich": ("wealthy", "poor"),
    "quiet": ("silent", "loud"),
    "ancient": ("old", "modern"),
    "angry": ("furious", "calm"),
    "hot": ("warm", "cold"),
    "strong": ("powerful", "weak"),
    "bright": ("luminous", "dim"),
}
_CONCEPTS = {
    "photosynthesis": "the process by which plants use sunlight, water and carbon dioxide to make glucose and "
    "release oxygen",
    "inflation": "a general rise in prices over time, which reduces how much a unit of money can buy",
    "a black hole": "a region of space where gravity is so strong that nothing, not even light, can escape it",
    "machine learning": "a field of computer science in which programs improve at a task by learning patterns "
    "from data instead of following hand-written rules",
    "democracy": "a system of government in which citizens choose their representatives in free elections",
    "an ecosystem": "a community of living organisms interacting with each other and with their physical "
    "environment",
    "compound interest": "interest computed on the original amount plus the interest already added to it",
    "a vaccine": "a preparation that trains the immune system to recognise a pathogen without causing the "
    "disease",
    "plate tectonics": "the theory that the Earth's outer shell is split into plates that slowly move over the "
    "mantle",
    "an algorithm": "a finite sequence of well-defined steps that solves a problem or performs a computation",
    "supply and demand": "the economic model in which prices settle where the quantity buyers want equals the "
    "quantity sellers offer",
    "the water cycle": "the continuous movement of water through evaporation, condensation, precipitation and "
    "collection",
}
_CONCEPT_DETAILS = (
    "A simple way to picture it is to think of an everyday example.",
    "It matters because it shapes many things we see around us.",
    "Scientists and teachers often use diagrams to explain it.",
    "Understanding it helps when reading the news or studying further.",
)
_PRODUCTS = ("headphones", "blender", "backpack", "laptop", "coffee maker", "novel", "hotel stay", "bicycle")
_POSITIVE = (
    "works perfectly",
    "exceeded my expectations",
    "is worth every penny",
    "arrived early and looks great",
)
_NEGATIVE = (
    "broke after two days",
    "was a waste of money",
    "arrived damaged",
    "stopped working within a week",
)
_PEOPLE = ("my manager", "a colleague", "the landlord", "a customer", "my team", "a professor")
_TOPICS = (
    "a delayed project",
    "a meeting next Tuesday",
    "a broken heater",
    "a late invoice",
    "the quarterly report",
    "a schedule change",
)
_TONES = ("polite", "friendly", "formal", "brief")
_DISHES = {
    "pancakes": (
        "flour, milk, eggs, sugar, butter",
        "Whisk the ingredients into a smooth batter, rest it for ten "
        "minutes, then cook ladlefuls on a hot buttered pan until golden on both sides.",
    ),
    "tomato soup": (
        "tomatoes, onion, garlic, stock, olive oil",
        "Soften the onion and garlic in oil, add "
        "chopped tomatoes and stock, simmer for twenty minutes, then blend until smooth.",
    ),
    "fried rice": (
        "cooked rice, eggs, peas, soy sauce, spring onions",
        "Scramble the eggs, stir-fry the peas, add "
        "the cold rice and soy sauce, toss until hot and finish with spring onions.",
    ),
    "guacamole": (
        "avocados, lime, onion, coriander, salt",
        "Mash the avocados, stir in lime juice, finely "
        "chopped onion and coriander, and season with salt to taste.",
    ),
    "omelette": (
        "eggs, butter, salt, pepper, cheese",
        "Beat the eggs with salt and pepper, pour into foaming "
        "butter, stir gently, add cheese and fold once the top is just set.",
    ),
}
_ADVICE = {
    "sleep better": (
        "keep a regular bedtime",
        "avoid screens in the last hour before sleep",
        "keep the bedroom cool and dark",
    ),
    "learn a new language": (
        "practise a little every day",
        "speak with native speakers early",
        "learn the most frequent words first",
    ),
    "save money": (
        "track every expense for a month",
        "set up an automatic transfer to savings",
        "cancel subscriptions you do not use",
    ),
    "prepare for an interview": (
        "research the company",
        "practise answers to common questions aloud",
        "prepare two questions for the interviewer",
    ),
    "stay focused while studying": (
        "work in 25-minute blocks",
        "put the phone in another room",
        "write down the goal of each session",
    ),
}
_CODE_TASKS = {
    "returns the sum of a list of numbers": "def total(numbers):\n    return sum(numbers)",
    "checks whether a string is a palindrome": "def is_palindrome(text):\n    cleaned = text.lower()\n"
    "    return cleaned == cleaned[::-1]",
    "returns the largest of three numbers": "def largest(a, b, c):\n    return max(a, b, c)",
    "counts the vowels in a string": "def count_vowels(text):\n    return sum(ch in 'aeiou' for ch in text.lower())",
    "reverses the words of a sentence": "def reverse_words(sentence):\n    return ' '.join(reversed(sentence.split()))",
    "returns the factorial of n": "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n"
    "        result *= i\n    return result",
    "removes duplicates from a list while keeping order": "def unique(items):\n    seen = set()\n"
    "    return [x for x in items if not (x in seen or seen.add(x))]",
}
_WORDS = (
    "river",
    "planet",
    "garden",
    "melody",
    "lantern",
    "harbor",
    "silver",
    "canyon",
    "orbit",
    "meadow",
    "pepper",
    "castle",
    "thunder",
    "violet",
    "puzzle",
    "rocket",
)
_CODE_LANGUAGES = ("Python",)


def _pick(rng: np.random.Generator, options: Any) -> Any:
    options = list(options)
    return options[int(rng.integers(len(options)))]


# -- task families ---------------------------------------------------------------------------------------
def _arithmetic(rng: np.random.Generator) -> Example:
    a, b = int(rng.integers(2, 500)), int(rng.integers(2, 500))
    phrasing = int(rng.integers(4))
    if phrasing == 0:
        return Example(0, f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}.")
    if phrasing == 1:
        return Example(
            1,
            "Multiply the two numbers.",
            f"{a % 50} and {b % 50}",
            f"{a % 50} × {b % 50} = {(a % 50) * (b % 50)}.",
        )
    if phrasing == 2:
        return Example(
            2,
            f"Subtract {min(a, b)} from {max(a, b)}.",
            "",
            f"{max(a, b)} − {min(a, b)} = {max(a, b) - min(a, b)}.",
        )
    apples, eaten = a % 40 + 10, b % 10 + 1
    return Example(
        3,
        f"Sam has {apples} apples and eats {eaten}. How many apples are left?",
        "",
        f"Sam starts with {apples} apples and eats {eaten}, so {apples} − {eaten} = "
        f"{apples - eaten} apples are left.",
    )


def _unit_conversion(rng: np.random.Generator) -> Example:
    phrasing = int(rng.integers(3))
    value = int(rng.integers(1, 200))
    if phrasing == 0:
        return Example(
            0,
            f"Convert {value} kilometres to miles.",
            "",
            f"{value} km is about {value * 0.621371:.1f} miles (1 km ≈ 0.621 miles).",
        )
    if phrasing == 1:
        celsius = value - 50
        return Example(
            1,
            f"What is {celsius} °C in Fahrenheit?",
            "",
            f"{celsius} °C = {celsius * 9 / 5 + 32:.1f} °F, using F = C × 9/5 + 32.",
        )
    return Example(
        2, f"How many pounds is {value} kg?", "", f"{value} kg ≈ {value * 2.20462:.1f} lb (1 kg ≈ 2.205 lb)."
    )


def _string_edit(rng: np.random.Generator) -> Example:
    word = _pick(rng, _WORDS)
    phrasing = int(rng.integers(4))
    if phrasing == 0:
        return Example(0, "Reverse the letters of the word.", word, word[::-1])
    if phrasing == 1:
        return Example(1, f"Write the word '{word}' in capital letters.", "", word.upper())
    if phrasing == 2:
        letter = _pick(rng, sorted(set(word)))
        return Example(
            2,
            f"How many times does the letter '{letter}' appear in '{word}'?",
            "",
            f"The letter '{letter}' appears {word.count(letter)} time(s) in '{word}'.",
        )
    words = [_pick(rng, _WORDS) for _ in range(4)]
    return Example(3, "Sort these words alphabetically.", ", ".join(words), ", ".join(sorted(words)))


def _list_ops(rng: np.random.Generator) -> Example:
    numbers = [int(x) for x in rng.integers(1, 100, size=int(rng.integers(4, 8)))]
    text = ", ".join(map(str, numbers))
    phrasing = int(rng.integers(4))
    if phrasing == 0:
        return Example(
            0, "Find the largest number in the list.", text, f"The largest number is {max(numbers)}."
        )
    if phrasing == 1:
        return Example(1, "Sort the numbers in ascending order.", text, ", ".join(map(str, sorted(numbers))))
    if phrasing == 2:
        return Example(2, "What is the sum of these numbers?", text, f"The sum is {sum(numbers)}.")
    mean = sum(numbers) / len(numbers)
    return Example(3, "Compute the average of the list.", text, f"The average is {mean:.2f}.")


def _dates(rng: np.random.Generator) -> Example:
    day = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    phrasing = int(rng.integers(3))
    if phrasing == 0:
        return Example(
            0,
            f"What day of the week was {day:%B} {day.day}, {day.year}?",
            "",
            f"{day:%B} {day.day}, {day.year} was a {day:%A}.",
        )
    if phrasing == 1:
        return Example(
            1,
            f"How many days are there in {day:%B} {day.year}?",
            "",
            f"{day:%B} {day.year} has {calendar.monthrange(day.year, day.month)[1]} days.",
        )
    later = day + dt.timedelta(days=10)
    return Example(
        2,
        f"Which date is 10 days after {day.isoformat()}?",
        "",
        f"10 days after {day.isoformat()} is {later.isoformat()}.",
    )


def _sentiment(rng: np.random.Generator) -> Example:
    product = _pick(rng, _PRODUCTS)
    positive = bool(rng.integers(2))
    review = f"This {product} {_pick(rng, _POSITIVE if positive else _NEGATIVE)}."
    label = "positive" if positive else "negative"
    phrasing = int(rng.integers(2))
    if phrasing == 0:
        return Example(
            0, "Classify the sentiment of the review as positive or negative.", review, label.capitalize()
        )
    return Example(
        1,
        "Is the following customer review happy or unhappy?",
        review,
        f"The review is {label}: the customer is {'happy' if positive else 'unhappy'} with the {product}.",
    )


def _capitals(rng: np.random.Generator) -> Example:
    country = _pick(rng, _CAPITALS)
    phrasing = int(rng.integers(2))
    if phrasing == 0:
        return Example(
            0, f"What is the capital of {country}?", "", f"The capital of {country} is {_CAPITALS[country]}."
        )
    return Example(1, "Name the capital city of the country.", country, _CAPITALS[country])


def _vocabulary(rng: np.random.Generator) -> Example:
    word = _pick(rng, _SYNONYMS)
    synonym, antonym = _SYNONYMS[word]
    if rng.integers(2):
        return Example(0, f"Give a synonym for '{word}'.", "", f"A synonym for '{word}' is '{synonym}'.")
    return Example(1, f"What is the opposite of '{word}'?", "", f"The opposite of '{word}' is '{antonym}'.")


def _translation(rng: np.random.Generator) -> Example:
    word = _pick(rng, _TRANSLATIONS)
    index = int(rng.integers(len(_LANGUAGES)))
    language = _LANGUAGES[index]
    if rng.integers(2):
        return Example(
            0,
            f"Translate the word '{word}' into {language}.",
            "",
            f"'{word}' in {language} is '{_TRANSLATIONS[word][index]}'.",
        )
    return Example(1, f"How do you say '{word}' in {language}?", "", _TRANSLATIONS[word][index])


def _code(rng: np.random.Generator) -> Example:
    task = _pick(rng, _CODE_TASKS)
    if rng.integers(2):
        return Example(0, f"Write a Python function that {task}.", "", f"```python\n{_CODE_TASKS[task]}\n```")
    return Example(
        1,
        "Implement the following in Python.",
        f"A function that {task}.",
        f"Here is a simple implementation:\n\n```python\n{_CODE_TASKS[task]}\n```",
    )


def _definitions(rng: np.random.Generator) -> Example:
    concept = _pick(rng, _CONCEPTS)
    details = " ".join(_pick(rng, _CONCEPT_DETAILS) for _ in range(2))
    if rng.integers(2):
        return Example(
            0,
            f"Explain what {concept} is.",
            "",
            f"{concept[0].upper()}{concept[1:]} is {_CONCEPTS[concept]}. {details}",
        )
    return Example(
        1,
        f"Describe {concept} to a ten-year-old.",
        "",
        f"Imagine this: {concept} is {_CONCEPTS[concept]}. {details}",
    )


def _emails(rng: np.random.Generator) -> Example:
    person, topic, tone = _pick(rng, _PEOPLE), _pick(rng, _TOPICS), _pick(rng, _TONES)
    body = (
        f"Hello,\n\nI am writing about {topic}. I wanted to let you know where things stand and what I "
        f"suggest as next steps. Could we find a few minutes this week to discuss it?\n\n"
        f"Thank you for your time.\n\nBest regards"
    )
    if tone == "brief":
        body = f"Hi,\n\nQuick note about {topic}: can we talk this week?\n\nThanks"
    return Example(0, f"Write a {tone} email to {person} about {topic}.", "", body)


def _recipes(rng: np.random.Generator) -> Example:
    dish = _pick(rng, _DISHES)
    ingredients, method = _DISHES[dish]
    if rng.integers(2):
        return Example(0, f"How do I make {dish}?", "", f"Ingredients: {ingredients}.\n\nMethod: {method}")
    return Example(1, f"List the ingredients needed for {dish}.", "", f"You need: {ingredients}.")


def _advice(rng: np.random.Generator) -> Example:
    goal = _pick(rng, _ADVICE)
    tips = _ADVICE[goal]
    if rng.integers(2):
        return Example(
            0,
            f"Give me three tips to {goal}.",
            "",
            "\n".join(f"{i}. {tip[0].upper()}{tip[1:]}." for i, tip in enumerate(tips, 1)),
        )
    return Example(
        1,
        f"What is the single most important thing I can do to {goal}?",
        "",
        f"Start here: {tips[0]}. Once that is a habit, {tips[1]}.",
    )


FAMILIES: dict[str, Generator] = {
    "arithmetic": _arithmetic,
    "unit_conversion": _unit_conversion,
    "string_edit": _string_edit,
    "list_ops": _list_ops,
    "dates": _dates,
    "sentiment": _sentiment,
    "capitals": _capitals,
    "vocabulary": _vocabulary,
    "translation": _translation,
    "code": _code,
    "definitions": _definitions,
    "emails": _emails,
    "recipes": _recipes,
    "advice": _advice,
}
# uneven family sizes, as in real pools: some tasks dominate
_FAMILY_WEIGHTS = np.array([14, 8, 10, 10, 6, 9, 7, 5, 6, 5, 7, 4, 4, 5], dtype=np.float64)

_BAD_ANSWERS = (
    "I don't know.",
    "As an AI, I cannot answer that.",
    "Sorry, I am not sure what you mean.",
    "The answer is 42.",
    "lorem ipsum dolor sit amet",
)


def _degrade(rng: np.random.Generator, output: str) -> str:
    """A plausible low-quality answer: refusal/noise, truncated, or off by a bit."""
    kind = int(rng.integers(3))
    if kind == 0 or len(output) < 12:
        return _pick(rng, _BAD_ANSWERS)
    if kind == 1:
        return output[: max(3, len(output) // 4)].rstrip()
    return "".join(ch if not ch.isdigit() else str((int(ch) + 3) % 10) for ch in output) + " (maybe)"


def _near_duplicate(rng: np.random.Generator, instruction: str) -> str:
    edits: list[Callable[[str], str]] = [
        lambda s: s.lower(),
        lambda s: s.rstrip(".?!") + ("!" if s.endswith("?") else "?"),
        lambda s: "Please " + s[0].lower() + s[1:],
        lambda s: s.replace(" ", "  ", 1),
        lambda s: s + " Thanks.",
    ]
    return edits[int(rng.integers(len(edits)))](instruction)


def demo_rows(n_rows: int = DEMO_ROWS, seed: int = 0) -> list[dict[str, Any]]:
    """The demo pool as a list of dicts (see the module docstring for the columns)."""
    if n_rows < 20:
        from hf_dataselect.errors import InputError

        raise InputError(f"The demo pool needs at least 20 rows, got {n_rows}.")
    rng = np.random.default_rng(seed)
    names = list(FAMILIES)
    n_duplicates = round(n_rows * NEAR_DUPLICATE_SHARE)
    n_originals = n_rows - n_duplicates
    family_of = rng.choice(len(names), size=n_originals, p=_FAMILY_WEIGHTS / _FAMILY_WEIGHTS.sum())
    low_quality = set(
        rng.choice(n_originals, size=round(n_originals * LOW_QUALITY_SHARE), replace=False).tolist()
    )
    rows: list[dict[str, Any]] = []
    for i, family_index in enumerate(family_of):
        family = names[family_index]
        example = FAMILIES[family](rng)
        bad = i in low_quality
        output = _degrade(rng, example.output) if bad else example.output
        rating = float(np.clip(np.round(rng.normal(3.0 if bad else 7.5, 1.3)), 1, 10))
        rows.append(_row(example, family, output, rating, bad, near_duplicate=False))
    sources = rng.choice(n_originals, size=n_duplicates, replace=True)
    for source in sources:
        original = rows[int(source)]
        copy = dict(
            original, instruction=_near_duplicate(rng, original["instruction"]), is_near_duplicate=True
        )
        rows.append(copy)
    order = rng.permutation(len(rows))
    shuffled = [rows[int(i)] for i in order]
    for number, row in enumerate(shuffled):
        row["id"] = f"demo-{number:05d}"
    return [{"id": r.pop("id"), **r} for r in shuffled]


def _row(
    example: Example, family: str, output: str, rating: float, bad: bool, *, near_duplicate: bool
) -> dict:
    return {
        "instruction": example.instruction,
        "input": example.input,
        "output": output,
        "rating": rating,
        "task": f"{family}/{example.phrasing}",
        "family": family,
        "is_near_duplicate": near_duplicate,
        "is_low_quality": bad,
    }


def demo_pool(n_rows: int = DEMO_ROWS, seed: int = 0) -> Dataset:
    """The demo pool as a :class:`datasets.Dataset` (deterministic for ``n_rows`` and ``seed``)."""
    from datasets import Dataset

    return Dataset.from_list(demo_rows(n_rows, seed))


def demo_pool_path(n_rows: int = DEMO_ROWS, seed: int = 0, cache_dir: str | None = None) -> str:
    """A JSONL copy of the demo pool in the cache (written once, atomically).

    Loading the pool from a file rather than from memory gives it a stable fingerprint, so the embeddings and
    features computed by ``.map`` on it are cached between runs like those of any dataset on disk.
    """
    import json
    import os
    from pathlib import Path

    from hf_dataselect import atomic

    folder = Path(
        cache_dir or os.environ.get("HF_DATASELECT_CACHE", Path.home() / ".cache" / "hf_dataselect")
    )
    path = folder / "demo" / f"demo-pool-{n_rows}-seed{seed}.jsonl"
    if path.is_file():
        return str(path)
    lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in demo_rows(n_rows, seed))
    atomic.write_text(path, "".join(lines))
    return str(path)
