"""The bundled synthetic story corpus: deterministic by seed, varied, with dialogue."""

import random
import re
import time

from rafale.data.synthetic import generate_stories


def test_same_seed_same_corpus_other_seed_other_corpus():
    assert generate_stories(200, seed=3) == generate_stories(200, seed=3)
    assert generate_stories(200, seed=3) != generate_stories(200, seed=4)


def test_global_random_state_is_left_alone():
    random.seed(0)
    expected = random.random()
    random.seed(0)
    generate_stories(50, seed=1)
    assert random.random() == expected


def test_stories_are_varied():
    stories = generate_stories(2000, seed=0)
    assert len(set(stories)) == len(stories)
    first_sentences = {story.split(". ")[0] for story in stories}
    assert len(first_sentences) > 1000
    names = {name for story in stories for name in re.findall(r"named (\w+)", story)}
    assert len(names) >= 40
    places = {place for story in stories for place in re.findall(r"in an? \w+ (\w+)[,.]", story)}
    assert len(places) >= 12
    openings = {" ".join(story.split()[:2]) for story in stories}
    assert {"Once upon", "One day,", "Long ago,"} <= openings


def test_stories_have_dialogue_and_a_few_sentences():
    stories = generate_stories(500, seed=7)
    with_quotes = [story for story in stories if re.search(r'"[A-Z][^"]+[.?!,]"', story)]
    assert len(with_quotes) > 400
    for story in stories:
        sentences = re.findall(r"[.?!]", story)
        assert 5 <= len(sentences) <= 20
        assert story[0].isupper() and story.endswith(".")


def test_twenty_thousand_stories_are_quick():
    start = time.perf_counter()
    assert len(generate_stories(20000, seed=0)) == 20000
    assert time.perf_counter() - start < 2
