"""rafale's bundled instruction-tuning set: Alpaca-style records generated from a seed, for supervised fine-tuning.

Each record is `{"instruction", "input", "output", "kind"}` (`input` is "" when the task has none). The tasks are
the kind a tiny decoder can learn in a few minutes on a CPU: every answer is short, follows from the prompt by one
rule, and uses the simple vocabulary of the synthetic stories (`rafale.data.synthetic`), so a model pretrained on
those stories already knows the words. Each kind puts its question in two to six phrasings.

- **story_things**: two or three sentences like "Lily had a red ball."; asked for the color of someone's thing
  ("red") or who had a thing ("Lily"). The answer is copied from the input.
- **story_place**: "Tom lived on the farm." sentences; "Where did Tom live?" -> "on the farm", copied.
- **reverse**, **sort**, **first_last**, **count**: a list of three to five words or digits, reversed, sorted
  (the instruction says which way) or asked for its first or last word; or two to seven words, counted. The rule
  is the same for every list, so it must be learned, not memorised: there are far more lists than any run sees.
- **addition** ("What is 3 plus 4?" -> "7") and **compare** ("Which number is bigger, 12 or 47?" -> "47").
- **opposite**, **animal_sound**, **plural**, **category**: a small fixed lexicon (hot -> cold, cow -> moo,
  box -> boxes, "Which one is a fruit: car, pear, hat?" -> "pear"), asked in several phrasings, so a prompt held out
  from training still asks about a word that training showed in other words.
- **sentence**: "Write a sentence about a shy fox in the forest." -> "The shy fox hid in the forest.": a template
  whose verb belongs to the animal; a whole sentence must match, so it stays hard.

The copy and list kinds are learnable from the prompt alone; counting, reversing five words and whole sentences stay
hard for a tiny model, so a score on held-out prompts is clearly above zero without being solved. Everything is
drawn from one `random.Random(seed)`: the same seed gives the same records on every machine. No two records share
an (instruction, input) pair; a kind whose every pair is used drops out of the draw.

The preference pairs (`generate_preferences`) are the same records with the right answer chosen and a near miss
rejected: a wrong answer built from the right one by one of its kind's rules (`near_misses`), the mistakes a tiny
SFT model makes on held-out prompts: another child, color or place of the same story; a list with two neighbours
swapped or one word changed; a sum, count or number off by one or two, or a number of the question; the other end
of a list; the asked word for its opposite; a plural by the wrong rule; another option, or a word of the category
that the options do not hold; a sentence with another verb or place. Pushing such answers down corrects the model
where it errs; another record's answer is far from anything it would say.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from math import perm
from typing import Callable

from rafale.data.synthetic import ANIMALS, BOYS, GIRLS, OBJECTS, PLACES

STORY_SIZES = range(2, 4)  # sentences in a story
LIST_LENGTHS = range(3, 6)  # words (or digits) in a list to reverse, sort or pick from
COUNT_LENGTHS = range(2, 8)
DISTRACTORS = range(2, 4)  # wrong options next to the answer of a category question
NAMES = GIRLS + BOYS
# synthetic.COLORS also holds "big", "shiny", ...: a question about a color needs real colors.
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "brown", "black", "white", "gray"]
ANIMAL_KINDS = [kind for kind, _ in ANIMALS]
# One word each, so that a list of them splits back into its words.
LIST_WORDS = [thing for thing in OBJECTS if " " not in thing] + ANIMAL_KINDS
PREPOSITIONS = {"beach": "by", "farm": "on", "hill": "on", "lake": "by", "island": "on", "park": "near",
                "meadow": "near"}
HOMES = [f"{PREPOSITIONS.get(place, 'in')} the {place}" for place, _ in PLACES]
ADJECTIVES = ["happy", "sad", "little", "big", "sleepy", "brave", "hungry", "funny", "kind", "shy"]
# Every word has one opposite, and no word appears twice.
OPPOSITE_PAIRS = [("hot", "cold"), ("big", "small"), ("happy", "sad"), ("fast", "slow"), ("up", "down"),
                  ("day", "night"), ("open", "closed"), ("wet", "dry"), ("light", "dark"), ("tall", "short"),
                  ("full", "empty"), ("loud", "quiet"), ("hard", "soft"), ("young", "old"), ("clean", "dirty"),
                  ("rich", "poor"), ("early", "late"), ("near", "far"), ("in", "out"), ("left", "right"),
                  ("yes", "no"), ("good", "bad"), ("black", "white"), ("strong", "weak"), ("thick", "thin"),
                  ("high", "low"), ("push", "pull"), ("first", "last"), ("top", "bottom"), ("sweet", "sour")]
OPPOSITES = dict(OPPOSITE_PAIRS) | {second: first for first, second in OPPOSITE_PAIRS}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
          "lion": "roar", "bird": "tweet", "frog": "ribbit", "owl": "hoot", "mouse": "squeak", "horse": "neigh",
          "bee": "buzz", "snake": "hiss", "hen": "cluck", "donkey": "hee-haw"}
IRREGULAR_PLURALS = {"mouse": "mice", "child": "children", "man": "men", "woman": "women", "foot": "feet",
                     "tooth": "teeth", "goose": "geese", "sheep": "sheep", "fish": "fish", "leaf": "leaves",
                     "wolf": "wolves", "knife": "knives"}
# Every rule of `_plural_of` at work; dict.fromkeys drops "mouse", which is also an animal of LIST_WORDS.
PLURAL_NOUNS = list(dict.fromkeys(LIST_WORDS + ["bus", "dish", "glass", "watch", "brush", "peach", "berry", "cherry",
                                                "story", "baby", "party", "city", "lady", "toy", "day"]
                                  + list(IRREGULAR_PLURALS)))
# (how a question names the category, its words); no word is in two categories.
CATEGORIES = [("a fruit", ["apple", "banana", "pear", "grape", "plum", "cherry", "lemon", "peach", "mango", "melon"]),
              ("an animal", ANIMAL_KINDS),
              ("a color", COLORS),
              ("a vehicle", ["car", "bus", "train", "truck", "plane", "ship", "tractor", "van"]),
              ("something you wear", ["hat", "shoe", "sock", "coat", "shirt", "dress", "scarf", "glove"])]
ACTIONS = {"dog": "ran", "cat": "slept", "bunny": "hopped", "bird": "sang", "bear": "ate", "fox": "hid",
           "frog": "jumped", "duck": "swam", "mouse": "squeaked", "owl": "hooted", "lion": "roared",
           "turtle": "rested", "puppy": "played", "squirrel": "climbed"}


def _with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _story_things(rng: random.Random) -> tuple[str, str, str]:
    """A few children, each with a thing of some color; names and things differ, so every question has one answer."""
    size = rng.choice(STORY_SIZES)
    names = rng.sample(NAMES, size)
    things = rng.sample(OBJECTS, size)
    colors = [rng.choice(COLORS) for _ in range(size)]
    story = " ".join(f"{name} had {_with_article(f'{color} {thing}')}."
                     for name, color, thing in zip(names, colors, things))
    i = rng.randrange(size)
    name, color, thing = names[i], colors[i], things[i]
    return rng.choice([(f"What color was {name}'s {thing}?", story, color),
                       (f"What color is the {thing} that {name} had?", story, color),
                       (f"Which color was {name}'s {thing}?", story, color),
                       (f"Who had the {thing}?", story, name),
                       (f"Who had the {color} {thing}?", story, name),
                       (f"Tell me who had the {thing}.", story, name)])


def _story_place(rng: random.Random) -> tuple[str, str, str]:
    size = rng.choice(STORY_SIZES)
    names = rng.sample(NAMES, size)
    homes = rng.sample(HOMES, size)
    story = " ".join(f"{name} lived {home}." for name, home in zip(names, homes))
    i = rng.randrange(size)
    instruction = rng.choice([f"Where did {names[i]} live?", f"Where was {names[i]}'s home?",
                              f"Tell me where {names[i]} lived."])
    return instruction, story, homes[i]


def _word_list(rng: random.Random, lengths: range) -> list[str]:
    return rng.sample(LIST_WORDS, rng.choice(lengths))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng, LIST_LENGTHS)
    listed, answer = " ".join(words), " ".join(reversed(words))
    return rng.choice([("Reverse the order of these words.", listed, answer),
                       ("Write these words backwards, last word first.", listed, answer),
                       (f"Reverse this list: {listed}", "", answer)])


def _sort(rng: random.Random) -> tuple[str, str, str]:
    digits = [rng.randrange(10) for _ in range(rng.choice(LIST_LENGTHS))]
    largest_first = rng.random() < 0.5
    if largest_first:
        instruction = rng.choice(["Sort these numbers from largest to smallest.",
                                  "Put these numbers in order, largest first."])
    else:
        instruction = rng.choice(["Sort these numbers from smallest to largest.",
                                  "Put these numbers in order, smallest first."])
    ordered = sorted(digits, reverse=largest_first)
    return instruction, " ".join(map(str, digits)), " ".join(map(str, ordered))


def _first_last(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng, LIST_LENGTHS)
    first = rng.random() < 0.5
    position = "first" if first else "last"
    instruction = rng.choice([f"What is the {position} word in this list?", f"Which word comes {position}?"])
    return instruction, " ".join(words), words[0] if first else words[-1]


def _count(rng: random.Random) -> tuple[str, str, str]:
    words = _word_list(rng, COUNT_LENGTHS)
    listed, answer = " ".join(words), str(len(words))
    return rng.choice([("How many words are in this list?", listed, answer),
                       ("Count the words in this list.", listed, answer),
                       (f"How many words are in: {listed}?", "", answer)])


def _addition(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    instruction, input_text = rng.choice([(f"What is {a} plus {b}?", ""), (f"Add {a} and {b}.", ""),
                                          (f"What is {a} + {b}?", ""), (f"How much is {a} plus {b}?", ""),
                                          ("Add these two numbers.", f"{a} and {b}")])
    return instruction, input_text, str(a + b)


def _compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(100), 2)
    return rng.choice([(f"Which number is bigger, {a} or {b}?", "", str(max(a, b))),
                       (f"Which is larger: {a} or {b}?", "", str(max(a, b))),
                       (f"Which number is smaller, {a} or {b}?", "", str(min(a, b))),
                       (f"Which is less: {a} or {b}?", "", str(min(a, b)))])


def _opposite(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(list(OPPOSITES))
    instruction, input_text = rng.choice([(f"What is the opposite of {word}?", ""),
                                          (f"Give the opposite of the word {word}.", ""),
                                          (f"What word means the opposite of {word}?", ""),
                                          ("What is the opposite of this word?", word)])
    return instruction, input_text, OPPOSITES[word]


def _animal_sound(rng: random.Random) -> tuple[str, str, str]:
    """Asked both ways round: the sound of an animal, or the animal that makes a sound."""
    animal, sound = rng.choice(list(SOUNDS.items()))
    return rng.choice([(f"What does {_with_article(animal)} say?", "", sound),
                       (f"What sound does {_with_article(animal)} make?", "", sound),
                       ("What sound does this animal make?", animal, sound),
                       (f"Which animal says {sound}?", "", animal),
                       ("Which animal makes this sound?", sound, animal)])


def _plural_of(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


def _plural(rng: random.Random) -> tuple[str, str, str]:
    noun = rng.choice(PLURAL_NOUNS)
    instruction, input_text = rng.choice([(f"What is the plural of {noun}?", ""),
                                          (f"Write the plural of the word {noun}.", ""),
                                          (f"How do you say more than one {noun}?", ""),
                                          ("Give the plural of this word.", noun)])
    return instruction, input_text, _plural_of(noun)


def _category(rng: random.Random) -> tuple[str, str, str]:
    """One word of the asked category among words of the others, at a random place in the list."""
    label, members = rng.choice(CATEGORIES)
    others = [word for other, words in CATEGORIES if other != label for word in words]
    options = rng.sample(others, rng.choice(DISTRACTORS))
    answer = rng.choice(members)
    options.insert(rng.randint(0, len(options)), answer)
    listed = ", ".join(options)
    instruction, input_text = rng.choice([(f"Which one is {label}: {listed}?", ""),
                                          (f"Which of these is {label}?", listed),
                                          (f"Pick the word that is {label}.", listed)])
    return instruction, input_text, answer


def _sentence(rng: random.Random) -> tuple[str, str, str]:
    adjective, animal, home = rng.choice(ADJECTIVES), rng.choice(ANIMAL_KINDS), rng.choice(HOMES)
    about = f"{_with_article(adjective)} {animal} {home}"
    instruction = rng.choice([f"Write a sentence about {about}.", f"Make up one sentence about {about}.",
                              f"Tell me about {about} in one sentence."])
    return instruction, "", f"The {adjective} {animal} {ACTIONS[animal]} {home}."


@dataclass(frozen=True)
class Task:
    make: Callable[[random.Random], tuple[str, str, str]]  # -> (instruction, input, output)
    # How many different (instruction, input) pairs `make` can return: exact, since a kind drops out of the draw
    # when that many are used (a count too high would leave the draw waiting for a pair that does not exist).
    distinct: int


def _lists(words: int, lengths: range) -> int:
    """How many lists of distinct words, of one of `lengths`, can be drawn from `words` words."""
    return sum(perm(words, length) for length in lengths)


def _category_questions() -> int:
    total = 0
    for label, members in CATEGORIES:
        others = sum(len(words) for other, words in CATEGORIES if other != label)
        # The answer, the distractors in order, and where among them the answer sits.
        total += len(members) * sum(perm(others, size) * (size + 1) for size in DISTRACTORS)
    return total


# Each count is (phrasings) x (what the phrasings are filled with); different choices always give different text.
TASKS = {
    "story_things": Task(_story_things, 6 * sum(perm(len(NAMES), size) * perm(len(OBJECTS), size)
                                                * len(COLORS) ** size * size for size in STORY_SIZES)),
    "story_place": Task(_story_place, 3 * sum(perm(len(NAMES), size) * perm(len(HOMES), size) * size
                                              for size in STORY_SIZES)),
    "reverse": Task(_reverse, 3 * _lists(len(LIST_WORDS), LIST_LENGTHS)),
    "sort": Task(_sort, 4 * sum(10**length for length in LIST_LENGTHS)),
    "first_last": Task(_first_last, 4 * _lists(len(LIST_WORDS), LIST_LENGTHS)),
    "count": Task(_count, 3 * _lists(len(LIST_WORDS), COUNT_LENGTHS)),
    "addition": Task(_addition, 5 * 10 * 10),
    "compare": Task(_compare, 4 * 100 * 99),
    "opposite": Task(_opposite, 4 * len(OPPOSITES)),
    "animal_sound": Task(_animal_sound, 5 * len(SOUNDS)),
    "plural": Task(_plural, 4 * len(PLURAL_NOUNS)),
    "category": Task(_category, 3 * _category_questions()),
    "sentence": Task(_sentence, 3 * len(ADJECTIVES) * len(ANIMAL_KINDS) * len(HOMES)),
}
KINDS: tuple[str, ...] = tuple(TASKS)
DISTINCT_RECORDS = sum(task.distinct for task in TASKS.values())


def generate_instructions(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n records {"instruction", "input", "output", "kind"} (input "" when the task has none), drawn from one
    random.Random(seed); no two records share the same (instruction, input) pair, so a held-out split carved from
    them never repeats a training prompt; raises ValueError if n exceeds how many distinct records exist
    (`DISTINCT_RECORDS`). Python's global random state is left alone."""
    if not 0 <= n <= DISTINCT_RECORDS:
        raise ValueError(f"n must be between 0 and {DISTINCT_RECORDS} (the number of distinct records), got {n}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    made = dict.fromkeys(KINDS, 0)
    open_kinds = list(KINDS)
    records = []
    while len(records) < n:
        kind = rng.choice(open_kinds)
        instruction, input_text, output = TASKS[kind].make(rng)
        if (instruction, input_text) in seen:
            continue
        seen.add((instruction, input_text))
        records.append({"instruction": instruction, "input": input_text, "output": output, "kind": kind})
        made[kind] += 1
        # A small kind (the lexicons, addition) runs out long before the lists and stories do.
        if made[kind] == TASKS[kind].distinct:
            open_kinds.remove(kind)
    return records


def _changed(words: list[str], index: int, word: str) -> str:
    return " ".join(words[:index] + [word] + words[index + 1:])


def _swapped(words: list[str], index: int) -> str:
    """The list with the words at index and index + 1 swapped."""
    return " ".join(words[:index] + [words[index + 1], words[index]] + words[index + 2:])


def _near_number(number: int, reach: int, limit: int) -> list[str]:
    """The numbers at most `reach` away, between 0 and limit."""
    return [str(other) for other in range(max(number - reach, 0), min(number + reach, limit) + 1) if other != number]


def _story_misses(record: dict[str, str]) -> list[list[str]]:
    """Another child, color or place of the same story (the wrong one of the options); one the story does not name."""
    answer, story = record["output"], record["input"]
    if record["kind"] == "story_place":
        named, lexicon = re.findall(r"\w+ lived (.+?)\.", story), HOMES
    elif answer in COLORS:
        named, lexicon = re.findall(r"\w+ had an? (\w+) ", story), COLORS
    else:
        named, lexicon = re.findall(r"(\w+) had ", story), NAMES
    return [named, [other for other in lexicon if other not in named]]


def near_misses(record: dict[str, str]) -> list[list[str]]:
    """Wrong answers to an instruction record of the kind a model that half-learned its rule gives, built by rule
    from the right answer and the prompt: a list per rule (a sum off by one or two, two neighbours swapped, the other
    number, another child of the story...). None is the right answer; no list is empty."""
    kind, answer = record["kind"], record["output"]
    numbers = [int(number) for number in re.findall(r"\d+", record["instruction"] + " " + record["input"])]
    words = answer.split()
    if kind in ("story_things", "story_place"):
        rules = _story_misses(record)
    elif kind == "reverse":
        others = [word for word in LIST_WORDS if word not in words]
        rules = [[_swapped(words, i) for i in range(len(words) - 1)],
                 [_changed(words, i, words[i - 1]) for i in range(1, len(words))],
                 [_changed(words, i, other) for i in range(len(words)) for other in others],
                 [" ".join(reversed(words))]]
    elif kind == "sort":
        rules = [[_swapped(words, i) for i in range(len(words) - 1)],
                 [_changed(words, i, near) for i, digit in enumerate(words) for near in _near_number(int(digit), 1, 9)],
                 [_changed(words, i, words[i - 1]) for i in range(1, len(words))]]
    elif kind == "first_last":
        rules = [record["input"].split()]
    elif kind == "count":
        rules = [_near_number(int(answer), 2, max(COUNT_LENGTHS) + 2)]
    elif kind == "addition":
        rules = [_near_number(int(answer), 2, 20), [str(number) for number in numbers]]
    elif kind == "compare":
        rules = [[str(number) for number in numbers], _near_number(int(answer), 2, 99)]
    elif kind == "opposite":
        rules = [[OPPOSITES[answer]], [word for word in OPPOSITES if word != OPPOSITES[answer]]]
    elif kind == "animal_sound":
        rules = [list(SOUNDS.values() if answer in SOUNDS.values() else SOUNDS)]
    elif kind == "plural":
        noun = next(noun for noun in PLURAL_NOUNS if _plural_of(noun) == answer)
        rules = [[noun, noun + "s", noun + "es"], [_plural_of(other) for other in PLURAL_NOUNS]]
    elif kind == "category":
        options = (record["input"] or record["instruction"].split(": ", 1)[1].rstrip("?")).split(", ")
        rules = [options, next(members for _, members in CATEGORIES if answer in members)]
    elif kind == "sentence":
        adjective, animal = words[1:3]
        home = answer[len(f"The {adjective} {animal} {ACTIONS[animal]} "):-1]
        rules = [[f"The {adjective} {animal} {action} {home}." for action in ACTIONS.values()],
                 [f"The {adjective} {animal} {ACTIONS[animal]} {other}." for other in HOMES]]
    else:
        raise ValueError(f"no near-miss rule for the kind {kind!r}")
    wrong = ([miss for miss in dict.fromkeys(rule) if miss != answer] for rule in rules)
    return [rule for rule in wrong if rule]


def generate_preferences(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n preference records {"instruction", "input", "chosen", "rejected", "kind"}: the instruction records of
    `generate_instructions(n, seed)`, each with its right answer as `chosen` and, as `rejected`, a plausible wrong
    one: a near miss (`near_misses`), of a rule drawn first and then one of its answers, from random.Random(seed + 1).
    Deterministic, as the instructions are."""
    rng = random.Random(seed + 1)
    preferences = []
    for record in generate_instructions(n, seed):
        rule = rng.choice(near_misses(record))
        preferences.append({"instruction": record["instruction"], "input": record["input"],
                            "chosen": record["output"], "rejected": rng.choice(rule), "kind": record["kind"]})
    return preferences
