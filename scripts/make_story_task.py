"""Writes rafale/evaluate/tasks/story_next_word.jsonl, the bundled lm-evaluation-harness task's items.

    python scripts/make_story_task.py

Stories from rafale's synthetic corpus under a seed that training does not use; each item is a story up to one
sentence's last word, that word, and three words that end other sentences (never the answer) as distractors.
A model trained on the corpus picks the word that fits the story; chance is 1 in 4.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from rafale.data.synthetic import generate_stories

ITEMS = 120
SEED = 20261202
OUT = Path(__file__).resolve().parents[1] / "rafale" / "evaluate" / "tasks" / "story_next_word.jsonl"


def main() -> None:
    rng = random.Random(SEED)
    stories = generate_stories(ITEMS, SEED)
    # Sentences whose last word is a plain word (not a quote's end) and that have at least four words before it.
    pattern = re.compile(r"(?<=[.!?]) ")
    endings = []
    candidates = []
    for story in stories:
        sentences = pattern.split(story)
        for index, sentence in enumerate(sentences):
            match = re.fullmatch(r"(.* \w+ \w+ \w+ \w+) (\w+)\.", sentence)
            if match:
                endings.append(match.group(2))
                candidates.append((" ".join(sentences[:index] + [match.group(1)]), match.group(2)))
    vocabulary = sorted(set(endings))
    items = []
    for context, answer in rng.sample(candidates, ITEMS):
        distractors = rng.sample([word for word in vocabulary if word != answer], 3)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    OUT.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    print(f"wrote {len(items)} items to {OUT}")


if __name__ == "__main__":
    main()
