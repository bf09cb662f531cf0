"""rafale's bundled corpus: short children's stories generated from a seed, so training works without a network.

Every story has a hero (a child, an animal or a grown-up with a job), a place, an opening ("Once upon a time"...),
a small plot with some dialogue, and an ending, in the simple vocabulary of TinyStories. The corpus is
repetitive enough for a tiny model to pick up its patterns in a few hundred steps, and varied enough (thousands
of combinations per plot) that its loss keeps falling for a while. Everything is drawn from one
`random.Random(seed)`: the same seed gives the same corpus on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

GIRLS = ["Lily", "Mia", "Sue", "Anna", "Emma", "Zoe", "Lucy", "Sara", "Ella", "Amy", "Rosa", "Nina", "Kate",
         "Maya", "Ruby", "Lena", "Ivy", "Jane", "Grace", "Molly", "Daisy", "Hana", "Chloe", "Nora", "Tara"]
BOYS = ["Tim", "Ben", "Max", "Sam", "Leo", "Tom", "Jack", "Finn", "Noah", "Jake", "Eli", "Omar", "Luke",
        "Ravi", "Theo", "Dan", "Kai", "Hugo", "Milo", "Oscar", "Pete", "Alex", "Joe", "Liam", "Ned"]
# (kind, adjectives that fit it); animals get a name from GIRLS or BOYS like the children.
ANIMALS = [("dog", ["happy", "fluffy", "brave"]), ("cat", ["sleepy", "curious", "soft"]),
           ("bunny", ["little", "fast", "shy"]), ("bird", ["tiny", "blue", "cheerful"]),
           ("bear", ["big", "kind", "hungry"]), ("fox", ["clever", "red", "quick"]),
           ("frog", ["green", "jumpy", "funny"]), ("duck", ["yellow", "silly", "small"]),
           ("mouse", ["tiny", "quiet", "gray"]), ("owl", ["wise", "old", "sleepy"]),
           ("lion", ["strong", "proud", "gentle"]), ("turtle", ["slow", "old", "patient"]),
           ("puppy", ["playful", "little", "happy"]), ("squirrel", ["busy", "quick", "brown"])]
JOBS = ["baker", "farmer", "doctor", "teacher", "fisherman", "painter", "pilot", "builder", "gardener",
        "firefighter", "singer", "mail carrier", "cook", "sailor", "nurse"]
CHILD_ADJECTIVES = ["little", "kind", "happy", "brave", "curious", "shy", "cheerful", "smart", "funny"]
PLACES = [("village", "small"), ("forest", "big"), ("beach", "sunny"), ("farm", "busy"), ("town", "quiet"),
          ("garden", "pretty"), ("park", "green"), ("house", "little"), ("hill", "tall"), ("lake", "blue"),
          ("city", "big"), ("meadow", "wide"), ("jungle", "warm"), ("castle", "old"), ("island", "tiny")]
OBJECTS = ["ball", "kite", "toy car", "hat", "book", "box", "teddy bear", "drum", "key", "boat", "doll",
           "flower", "shell", "map", "balloon", "cake", "blanket", "bike", "crayon", "cup", "ring", "stone"]
COLORS = ["red", "blue", "green", "yellow", "shiny", "big", "small", "pink", "purple", "old", "new", "soft"]
HIDING_SPOTS = ["under the bed", "behind a tree", "in the tall grass", "under a big rock", "next to the door",
                "inside an old box", "by the river", "under the table", "on top of the shelf", "in the sand"]
ACTIVITIES = ["play with a ball", "dance in the rain", "read books", "sing songs", "draw pictures",
              "build sand castles", "run in the park", "look at the stars", "climb trees", "bake cookies",
              "splash in puddles", "fly a kite", "pick flowers", "play hide and seek", "ride a bike",
              "watch the birds", "swim in the lake", "jump on the bed", "paint the sky", "plant seeds"]
FOODS = ["an apple", "a big cake", "some cookies", "a warm soup", "a sweet pie", "some bread", "a banana",
         "some honey", "a pizza", "some berries"]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "thankful"]
FEELINGS_BAD = ["sad", "scared", "worried", "upset", "lonely"]
OPENINGS = ["Once upon a time, there was {hero} who lived in {place}.",
            "One day, {hero} was playing in {place}.",
            "Long ago, in {place}, there lived {hero}.",
            "There was once {hero} who lived in {place}.",
            "Once upon a time, in {place}, lived {hero}."]
ENDINGS = ["From that day on, {name} and {friend} were best friends.",
           "{name} went home with a big smile.",
           "That night, {name} slept well and dreamed about the day.",
           "{name} learned that it is good to help others.",
           "{name} learned that friends make everything better.",
           "And they all lived happily ever after.",
           "It was the best day ever."]


@dataclass
class Character:
    name: str
    description: str  # "a curious little girl named Lily", without the article's capital
    he: str
    his: str
    him: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _capital(text: str) -> str:
    """`str.capitalize` would lower-case the names inside."""
    return text[0].upper() + text[1:]


def _character(rng: random.Random, taken: str = "") -> Character:
    """A child, an animal or a grown-up with a job; never named `taken`, so two characters differ."""
    girl = rng.random() < 0.5
    name = rng.choice([n for n in (GIRLS if girl else BOYS) if n != taken])
    kind = rng.random()
    if kind < 0.45:
        adjective = rng.choice(CHILD_ADJECTIVES)
        noun = "girl" if girl else "boy"
    elif kind < 0.85:
        noun, adjectives = rng.choice(ANIMALS)
        adjective = rng.choice(adjectives)
    else:
        noun, adjective = rng.choice(JOBS), rng.choice(["kind", "busy", "friendly", "old", "young"])
    description = f"{_article(adjective)} {adjective} {noun} named {name}"
    if girl:
        return Character(name, description, "she", "her", "her")
    return Character(name, description, "he", "his", "him")


def _thing(rng: random.Random) -> str:
    return f"{rng.choice(COLORS)} {rng.choice(OBJECTS)}"


def _lost_thing(rng: random.Random, hero: Character, friend: Character) -> list[str]:
    thing = _thing(rng)
    spot = rng.choice(HIDING_SPOTS)
    return [f"{hero.name} had {_article(thing)} {thing}. {hero.he.capitalize()} loved it very much.",
            f"One morning, {hero.name} could not find {hero.his} {thing}. {hero.he.capitalize()} felt "
            f"{rng.choice(FEELINGS_BAD)}.",
            f"{_capital(friend.description)} came by and asked, \"Why are you {rng.choice(FEELINGS_BAD)}?\"",
            f"\"I lost my {thing},\" said {hero.name}. \"Can you help me find it?\"",
            f"They looked everywhere. At last, {friend.name} found it {spot}.",
            f"\"Thank you!\" said {hero.name}. {hero.he.capitalize()} was so {rng.choice(FEELINGS_GOOD)}."]


def _new_friend(rng: random.Random, hero: Character, friend: Character) -> list[str]:
    activity = rng.choice(ACTIVITIES)
    return [f"{hero.name} loved to {rng.choice(ACTIVITIES)}, but {hero.he} had no one to play with.",
            f"One day, {hero.he} met {friend.description}.",
            f"\"Hello! Do you want to {activity} with me?\" asked {hero.name}.",
            f"\"Yes, I would love to!\" said {friend.name}.",
            f"They had so much fun together. "
            f"{hero.name} was not {rng.choice(FEELINGS_BAD)} anymore."]


def _found_thing(rng: random.Random, hero: Character, friend: Character) -> list[str]:
    thing = _thing(rng)
    return [f"{hero.name} liked to {rng.choice(ACTIVITIES)}.",
            f"One day, {hero.he} found {_article(thing)} {thing} {rng.choice(HIDING_SPOTS)}.",
            f"\"What is this?\" {hero.he} said. {hero.he.capitalize()} was very {rng.choice(['curious', 'excited'])}.",
            f"{hero.he.capitalize()} showed it to {friend.description}.",
            f"\"This {thing.split()[-1]} belongs to {rng.choice(GIRLS + BOYS)},\" said {friend.name}. "
            f"\"We should give it back.\"",
            f"So they gave it back, and everyone was {rng.choice(FEELINGS_GOOD)}."]


def _storm(rng: random.Random, hero: Character, friend: Character) -> list[str]:
    return [f"{hero.name} and {hero.his} friend {friend.name} went out to {rng.choice(ACTIVITIES)}.",
            f"Suddenly, the sky got dark and it began to {rng.choice(['rain', 'snow', 'thunder'])}.",
            f"{friend.name} was {rng.choice(FEELINGS_BAD)}. \"I want to go home,\" {friend.he} said.",
            f"\"Do not be afraid,\" said {hero.name}. \"We can hide {rng.choice(HIDING_SPOTS)}.\"",
            "They waited together until the sun came back.",
            f"Then they ate {rng.choice(FOODS)} and laughed."]


def _sharing(rng: random.Random, hero: Character, friend: Character) -> list[str]:
    food = rng.choice(FOODS)
    return [f"{hero.name} had {food}. It looked very good.",
            f"{_capital(friend.description)} saw it and felt {rng.choice(['hungry', 'sad', 'lonely'])}.",
            f"\"Can I have some?\" asked {friend.name}.",
            f"At first, {hero.name} did not want to share. Then {hero.he} saw {friend.name}'s face.",
            f"\"Here, we can share,\" said {hero.name}.",
            f"They ate together, and it tasted even better. Both of them were {rng.choice(FEELINGS_GOOD)}."]


def _help_job(rng: random.Random, hero: Character, friend: Character) -> list[str]:
    job = rng.choice(JOBS)
    return [f"{hero.name} wanted to be {_article(job)} {job} one day.",
            f"{hero.he.capitalize()} went to see {friend.description}, who knew a lot.",
            f"\"How can I be a good {job}?\" asked {hero.name}.",
            f"\"You must work hard and be kind,\" said {friend.name}.",
            f"Every day, {hero.name} practiced. {hero.he.capitalize()} made mistakes, but {hero.he} did not stop.",
            f"At last, {hero.name} could do it, and {hero.he} felt very {rng.choice(FEELINGS_GOOD)}."]


PLOTS = [_lost_thing, _new_friend, _found_thing, _storm, _sharing, _help_job]


def _story(rng: random.Random) -> str:
    hero = _character(rng)
    friend = _character(rng, taken=hero.name)
    kind, adjective = rng.choice(PLACES)
    place = f"{_article(adjective)} {adjective} {kind}"
    opening = rng.choice(OPENINGS).format(hero=hero.description, place=place)
    plot = rng.choice(PLOTS)(rng, hero, friend)
    ending = rng.choice(ENDINGS).format(name=hero.name, friend=friend.name)
    return " ".join([opening, *plot, ending])


def generate_stories(n: int, seed: int) -> list[str]:
    """`n` stories, the same for the same seed; the seed does not touch Python's global random state."""
    rng = random.Random(seed)
    return [_story(rng) for _ in range(n)]
