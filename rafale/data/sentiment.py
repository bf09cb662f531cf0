"""rafale's bundled labelled set: short reviews, "positive" or "negative", generated from a seed.

Each review is one opinion about a film, a meal, a book, a hotel or a gadget, sometimes between neutral
sentences that say nothing about it ("We went there on a Tuesday."). The opinion is not a bag of words:
a negation flips it ("The soup was not good." is negative) and in a contrast the clause after "but" decides
("The plot was dull, but the ending was wonderful." is positive), so a model has to read word order to get
them right; most opinions are plain statements, so a tiny model gets well above chance in a minute. Labels
alternate by a coin flip, so the classes are balanced. Everything is drawn from one `random.Random(seed)`.
"""

from __future__ import annotations

import random

LABELS = ("negative", "positive")
GOOD = ["good", "great", "wonderful", "excellent", "lovely", "delightful", "superb", "charming", "fantastic",
        "brilliant", "pleasant", "amazing", "enjoyable", "fun", "perfect"]
BAD = ["bad", "awful", "terrible", "boring", "dull", "poor", "horrible", "disappointing", "weak", "annoying",
       "dreadful", "bland", "clumsy", "tedious", "mediocre"]
LIKE = ["loved", "enjoyed", "liked", "adored", "admired"]
DISLIKE = ["hated", "disliked", "regretted", "could not stand", "was bored by"]
# The same verbs after "did not".
LIKE_BASE = ["love", "enjoy", "like", "adore", "admire"]
DISLIKE_BASE = ["hate", "dislike", "regret"]
INTENSIFIERS = ["", "", "very ", "really ", "quite ", "truly ", "rather ", "so "]
# Things one reviews, by domain, so that the parts of one review belong together.
DOMAINS = {
    "film": ["film", "movie", "plot", "acting", "ending", "soundtrack", "script", "cast", "story", "dialogue"],
    "meal": ["soup", "pasta", "dessert", "service", "pizza", "bread", "coffee", "menu", "salad", "wine"],
    "book": ["book", "novel", "first chapter", "writing", "main character", "story", "ending", "cover"],
    "hotel": ["room", "bed", "breakfast", "staff", "view", "pool", "hotel", "location", "shower"],
    "gadget": ["phone", "battery", "screen", "camera", "laptop", "keyboard", "charger", "speaker", "app"],
}
PEOPLE = ["I", "My sister", "My friend Anna", "Our neighbour", "The critic", "My brother", "Everyone", "Tom",
          "My mother", "The whole family", "Sara", "My colleague"]
FILLERS = ["We went there on a Tuesday.", "It was a cold evening.", "I had heard about it from a friend.",
           "This was my second visit.", "We were a group of four.", "It rained all day.",
           "I bought it last month.", "The place was close to the station.", "We arrived around noon.",
           "My cousin came along.", "It took an hour to get there.", "I read the reviews before going.",
           "The weather was mild.", "We paid with a card.", "It was a long week."]


def _adjective(rng: random.Random, positive: bool) -> str:
    return rng.choice(INTENSIFIERS) + rng.choice(GOOD if positive else BAD)


def _opinion(rng: random.Random, positive: bool) -> str:
    """One sentence whose sentiment is `positive`, in one of several shapes, some of them negated."""
    things = DOMAINS[rng.choice(list(DOMAINS))]
    thing, other = rng.sample(things, 2)
    person = rng.choice(PEOPLE)
    shape = rng.random()
    if shape < 0.3:
        return f"The {thing} was {_adjective(rng, positive)}."
    if shape < 0.5:
        verb = rng.choice(LIKE if positive else DISLIKE)
        return f"{person} {verb} the {thing}."
    if shape < 0.6:
        return f"{person} said the {thing} was {_adjective(rng, positive)}."
    if shape < 0.72:
        # Negation: the adjective says the opposite of the verdict.
        return f"The {thing} was not {rng.choice(BAD if positive else GOOD)}."
    if shape < 0.8:
        return f"{person} did not {rng.choice(DISLIKE_BASE if positive else LIKE_BASE)} the {thing}."
    if shape < 0.9:
        # Contrast: the clause after "but" decides.
        return f"The {other} was {_adjective(rng, not positive)}, but the {thing} was {_adjective(rng, positive)}."
    return f"Honestly, the {thing} was {_adjective(rng, positive)} from start to finish."


def _review(rng: random.Random, positive: bool) -> str:
    sentences = [_opinion(rng, positive)]
    if rng.random() < 0.5:
        sentences.insert(0, rng.choice(FILLERS))
    if rng.random() < 0.3:
        sentences.append(rng.choice(FILLERS))
    return " ".join(sentences)


def generate_sentiment(n: int, seed: int) -> tuple[list[str], list[str]]:
    """(`n` reviews, their labels "negative" / "positive"): the same for the same seed, Python's global random
    state untouched."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        positive = rng.random() < 0.5
        texts.append(_review(rng, positive))
        labels.append(LABELS[positive])
    return texts, labels
