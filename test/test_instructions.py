"""The bundled instruction-tuning set: deterministic by seed, unique prompts, and answers that are right; the bundled
preference pairs: the same records, each with a wrong answer that is a near miss of the right one.

The answer checks parse each record's own text and work the answer out again, so they test the records, not the
generator's tables.
"""

import random
import re
import time

import pytest

from rafale.data.instructions import DISTINCT_RECORDS, KINDS, generate_instructions, generate_preferences

# A little English the checks need, written here so that they do not lean on the generator's lexicons.
SOME_OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "wet": "dry", "fast": "slow",
                  "good": "bad", "open": "closed", "full": "empty", "young": "old", "top": "bottom"}
SOME_SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
               "lion": "roar", "frog": "ribbit", "owl": "hoot", "horse": "neigh"}
IRREGULAR_PLURALS = {"mouse": "mice", "child": "children", "man": "men", "woman": "women", "foot": "feet",
                     "tooth": "teeth", "goose": "geese", "sheep": "sheep", "fish": "fish", "leaf": "leaves",
                     "wolf": "wolves", "knife": "knives"}
SOME_MEMBERS = {"a fruit": {"apple", "banana", "pear"}, "an animal": {"dog", "cat", "frog"},
                "a color": {"red", "blue", "green"}, "a vehicle": {"car", "bus", "train"},
                "something you wear": {"hat", "shoe", "sock"}}


@pytest.fixture(scope="module")
def records():
    return generate_instructions(3000, seed=11)


@pytest.fixture(scope="module")
def many_records():
    """Enough records that the small kinds (lexicons, addition) are used up."""
    return generate_instructions(30000, seed=2)


def _listed(record) -> list[str]:
    """The list a record is about: its input, or what follows the colon of its instruction."""
    text = record["input"] or record["instruction"].split(": ", 1)[1].rstrip("?")
    return text.split()


def _asked_word(record) -> str:
    """The one word a lexicon question is about: its input, or the last word of its instruction."""
    return record["input"] or record["instruction"].split()[-1].rstrip("?.")


def check_story_things(record):
    owners = {name: (color, thing) for name, color, thing in
              re.findall(r"(\w+) had an? (\w+) ([a-z ]+)\.", record["input"])}
    assert 2 <= len(owners) <= 3
    assert len({thing for _, thing in owners.values()}) == len(owners)
    question, answer = record["instruction"], record["output"]
    if answer in owners:  # who had the thing
        color, thing = owners[answer]
        assert re.search(rf"the ({color} )?{thing}[?.]$", question)
    else:  # the color of someone's thing
        match = re.search(r"(\w+)'s |that (\w+) had", question)
        color, thing = owners[match.group(1) or match.group(2)]
        assert answer == color
        assert re.search(rf"\b{thing}\b", question)


def check_story_place(record):
    homes = dict(re.findall(r"(\w+) lived ([a-z ]+)\.", record["input"]))
    assert 2 <= len(homes) <= 3
    asked = [name for name in homes if re.search(rf"\b{name}\b", record["instruction"])]
    assert len(asked) == 1
    assert record["output"] == homes[asked[0]]


def check_reverse(record):
    words = _listed(record)
    assert 3 <= len(words) <= 5
    assert record["output"].split() == words[::-1]


def check_sort(record):
    numbers = [int(digit) for digit in record["input"].split()]
    first = re.search(r"from (\w+) to|(\w+) first", record["instruction"])
    largest_first = (first.group(1) or first.group(2)) == "largest"
    assert [int(digit) for digit in record["output"].split()] == sorted(numbers, reverse=largest_first)


def check_first_last(record):
    words = _listed(record)
    instruction = record["instruction"]
    assert ("first" in instruction) != ("last" in instruction)
    assert record["output"] == (words[0] if "first" in instruction else words[-1])


def check_count(record):
    assert record["output"] == str(len(_listed(record)))


def check_addition(record):
    a, b = map(int, re.findall(r"\d+", record["instruction"] + " " + record["input"]))
    assert record["output"] == str(a + b)


def check_compare(record):
    a, b = map(int, re.findall(r"\d+", record["instruction"]))
    wants_bigger = re.search(r"bigger|larger", record["instruction"]) is not None
    assert record["output"] == str(max(a, b) if wants_bigger else min(a, b))


def check_opposite(record):
    word = _asked_word(record)
    assert "opposite" in record["instruction"]
    assert record["output"] != word
    known = SOME_OPPOSITES | {second: first for first, second in SOME_OPPOSITES.items()}
    if word in known:
        assert record["output"] == known[word]


def check_animal_sound(record):
    if record["instruction"].startswith("Which animal"):
        animal, sound = record["output"], _asked_word(record)
    else:
        animal = record["input"] or re.search(r"does an? (\w+) ", record["instruction"]).group(1)
        sound = record["output"]
    assert animal != sound
    if animal in SOME_SOUNDS:
        assert sound == SOME_SOUNDS[animal]


def check_plural(record):
    noun = _asked_word(record)
    if noun in IRREGULAR_PLURALS:
        expected = IRREGULAR_PLURALS[noun]
    elif re.search(r"[^aeiou]y$", noun):
        expected = noun[:-1] + "ies"
    elif re.search(r"(s|x|ch|sh)$", noun):
        expected = noun + "es"
    else:
        expected = noun + "s"
    assert record["output"] == expected


def check_category(record):
    label = re.search(r"is (a fruit|an animal|a color|a vehicle|something you wear)", record["instruction"]).group(1)
    options = (record["input"] or record["instruction"].split(": ", 1)[1].rstrip("?")).split(", ")
    assert 3 <= len(options) <= 4 and len(set(options)) == len(options)
    assert record["output"] in options
    for option in options:
        if option in SOME_MEMBERS[label]:
            assert option == record["output"]
        if any(option in members for other, members in SOME_MEMBERS.items() if other != label):
            assert option != record["output"]


def check_sentence(record):
    about = re.fullmatch(r"(?:Write a sentence about|Make up one sentence about|Tell me about) an? (\w+) (\w+) "
                         r"(.+?)(?: in one sentence)?\.", record["instruction"])
    adjective, animal, place = about.groups()
    assert re.fullmatch(rf"The {adjective} {animal} \w+ {place}\.", record["output"])


CHECKS = {"story_things": check_story_things, "story_place": check_story_place, "reverse": check_reverse,
          "sort": check_sort, "first_last": check_first_last, "count": check_count, "addition": check_addition,
          "compare": check_compare, "opposite": check_opposite, "animal_sound": check_animal_sound,
          "plural": check_plural, "category": check_category, "sentence": check_sentence}


def test_same_seed_same_records_other_seed_other_records():
    assert generate_instructions(500, seed=3) == generate_instructions(500, seed=3)
    assert generate_instructions(500, seed=3) != generate_instructions(500, seed=4)
    assert generate_instructions(10) == generate_instructions(10, seed=0)


def test_n_is_respected_and_records_have_four_string_fields():
    assert generate_instructions(0) == []
    for n in (1, 37):
        assert len(generate_instructions(n, seed=5)) == n
    for record in generate_instructions(500, seed=5):
        assert set(record) == {"instruction", "input", "output", "kind"}
        assert all(isinstance(value, str) for value in record.values())
        assert record["instruction"] and record["output"] and record["kind"] in KINDS
        assert record["input"] == record["input"].strip()


def test_global_random_state_is_left_alone():
    random.seed(0)
    expected = random.random()
    random.seed(0)
    generate_instructions(200, seed=1)
    assert random.random() == expected


def test_every_kind_appears_in_two_thousand_records():
    assert len(KINDS) >= 8
    assert {record["kind"] for record in generate_instructions(2000, seed=0)} == set(KINDS)


def test_prompts_are_unique(records, many_records):
    for some in (records, many_records):
        prompts = [(record["instruction"], record["input"]) for record in some]
        assert len(set(prompts)) == len(prompts)


def test_used_up_kinds_stop_without_repeating(many_records):
    additions = [record for record in many_records if record["kind"] == "addition"]
    pairs = {tuple(re.findall(r"\d+", record["instruction"] + " " + record["input"])) for record in additions}
    assert len(pairs) == 100  # every sum of two digits, in several phrasings, each prompt once
    assert len(additions) < len(many_records) / len(KINDS)


def test_records_are_short(records):
    for record in records:
        words = " ".join([record["instruction"], record["input"], record["output"]]).split()
        assert len(words) <= 60
        assert len(record["output"].split()) <= 8
    short = [record for record in records if len(record["output"].split()) <= 6]
    assert len(short) > 0.9 * len(records)


def test_every_kind_has_a_check():
    assert set(CHECKS) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_answers_are_right(kind, records):
    of_kind = [record for record in records if record["kind"] == kind]
    assert len(of_kind) >= 20
    for record in of_kind:
        CHECKS[kind](record)


def test_lexicons_are_consistent(many_records):
    """A word always gets the same answer, whichever way round and however the question is put."""
    by_kind: dict[str, list[dict[str, str]]] = {kind: [] for kind in KINDS}
    for record in many_records:
        by_kind[record["kind"]].append(record)

    opposites: dict[str, set[str]] = {}
    for record in by_kind["opposite"]:
        opposites.setdefault(_asked_word(record), set()).add(record["output"])
    assert len(opposites) >= 40
    for word, answers in opposites.items():
        assert len(answers) == 1
        (opposite,) = answers
        assert opposites.get(opposite, {word}) == {word}

    sound_of, animal_of = {}, {}
    for record in by_kind["animal_sound"]:
        if record["instruction"].startswith("Which animal"):
            animal_of.setdefault(_asked_word(record), set()).add(record["output"])
        else:
            animal = record["input"] or re.search(r"does an? (\w+) ", record["instruction"]).group(1)
            sound_of.setdefault(animal, set()).add(record["output"])
    assert len(sound_of) >= 10 and all(len(sounds) == 1 for sounds in sound_of.values())
    assert {animal: sounds.pop() for animal, sounds in sound_of.items()} == {
        animal.pop(): sound for sound, animal in animal_of.items()}

    answers, distractors = {}, {}
    for record in by_kind["category"]:
        label = re.search(r"is (a fruit|an animal|a color|a vehicle|something you wear)", record["instruction"])[1]
        options = (record["input"] or record["instruction"].split(": ", 1)[1].rstrip("?")).split(", ")
        answers.setdefault(label, set()).add(record["output"])
        distractors.setdefault(label, set()).update(option for option in options if option != record["output"])
    assert set(answers) == set(SOME_MEMBERS)
    for label in answers:
        assert not answers[label] & distractors[label]

    verbs: dict[str, set[str]] = {}
    for record in by_kind["sentence"]:
        animal, verb = record["output"].split()[2:4]
        verbs.setdefault(animal, set()).add(verb)
    assert len(verbs) >= 10 and all(len(animal_verbs) == 1 for animal_verbs in verbs.values())


def test_too_many_records_is_an_error():
    assert DISTINCT_RECORDS > 200_000
    with pytest.raises(ValueError, match="distinct"):
        generate_instructions(DISTINCT_RECORDS + 1)
    with pytest.raises(ValueError):
        generate_instructions(-1)


def test_twenty_thousand_records_are_quick():
    start = time.perf_counter()
    assert len(generate_instructions(20000, seed=0)) == 20000
    assert time.perf_counter() - start < 1


def _one_position_apart(first: list[str], second: list[str]) -> bool:
    return len(first) == len(second) and sum(a != b for a, b in zip(first, second)) == 1


def near_story(pair):
    """Another child, color or place: a name for a name, one color word for a color, a place for a place."""
    chosen, rejected = pair["chosen"], pair["rejected"]
    if pair["kind"] == "story_place":
        assert re.fullmatch(r"(in|on|by|near) the [a-z]+", rejected)
    elif chosen[0].isupper():
        assert re.fullmatch(r"[A-Z][a-z]+", rejected)
    else:
        assert re.fullmatch(r"[a-z]+", rejected) and not re.search(rf"\b{rejected} (had|lived)\b", pair["input"])


def near_list(pair):
    """Reversed or sorted: the same words in another order, one word changed, or the list as given."""
    chosen, rejected = pair["chosen"].split(), pair["rejected"].split()
    given = (pair["input"] or pair["instruction"].split(": ", 1)[1]).split()
    assert (sorted(rejected) == sorted(chosen) or _one_position_apart(rejected, chosen) or rejected == given)
    if pair["kind"] == "sort":
        assert all(digit.isdigit() for digit in rejected)


def near_number(pair):
    """Off by one or two, or (addition, compare) a number of the question."""
    asked = re.findall(r"\d+", pair["instruction"] + " " + pair["input"])
    assert pair["rejected"].isdigit()
    assert abs(int(pair["rejected"]) - int(pair["chosen"])) <= 2 or (pair["kind"] != "count"
                                                                      and pair["rejected"] in asked)


def near_word(pair):
    """One word; for a category question, one of the options or a word of the asked category."""
    assert re.fullmatch(r"[a-z-]+", pair["rejected"])
    if pair["kind"] == "first_last":
        assert pair["rejected"] in pair["input"].split()


def near_sentence(pair):
    """The same animal doing another thing, or the same thing in another place."""
    chosen, rejected = pair["chosen"].split(), pair["rejected"].split()
    assert rejected[:3] == chosen[:3] and rejected[-1].endswith(".")
    assert (rejected[3] != chosen[3]) != (rejected[4:] != chosen[4:])


NEAR_MISS_CHECKS = {"story_things": near_story, "story_place": near_story, "reverse": near_list, "sort": near_list,
                    "first_last": near_word, "count": near_number, "addition": near_number,
                    "compare": near_number, "opposite": near_word, "animal_sound": near_word, "plural": near_word,
                    "category": near_word, "sentence": near_sentence}


@pytest.fixture(scope="module")
def preferences():
    return generate_preferences(3000, seed=11)


def test_preferences_are_the_instructions_with_a_wrong_answer_beside_the_right_one(records, preferences):
    assert len(preferences) == len(records)
    for record, pair in zip(records, preferences):
        assert (pair["instruction"], pair["input"], pair["chosen"], pair["kind"]) == (
            record["instruction"], record["input"], record["output"], record["kind"])
        assert pair["rejected"] != pair["chosen"]
    assert generate_preferences(300, seed=11) == preferences[:300]
    assert generate_preferences(300, seed=12) != preferences[:300]


def test_every_kind_has_a_near_miss_check():
    assert set(NEAR_MISS_CHECKS) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(NEAR_MISS_CHECKS))
def test_rejected_answers_are_near_misses_of_the_right_kind(kind, preferences):
    of_kind = [pair for pair in preferences if pair["kind"] == kind]
    assert len(of_kind) >= 20
    for pair in of_kind:
        NEAR_MISS_CHECKS[kind](pair)


def test_the_wrong_one_of_the_options_is_among_the_near_misses(preferences):
    """Where the prompt offers answers, some rejected ones are taken from it: the model's usual mistake."""
    for kind in ("story_things", "story_place", "compare", "category"):
        from_prompt = [pair["rejected"] in pair["instruction"] + " " + pair["input"] for pair in preferences
                       if pair["kind"] == kind]
        assert 0.2 < sum(from_prompt) / len(from_prompt) < 1
