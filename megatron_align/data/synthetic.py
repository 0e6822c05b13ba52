"""Small generated corpora so examples, tests and the demo never download anything.

Documents are composed from templates with varied wording (seeded), which gives
a tiny model real structure to learn: its loss falls well below the entropy of
random bytes within a few dozen steps.
"""

from __future__ import annotations

import json
import os
import random

_SUBJECTS = ["The farmer", "A young teacher", "The old fisherman", "My neighbour", "The baker", "A curious student",
             "The mayor", "The nurse", "A travelling musician", "The librarian", "Our coach", "The engineer"]
_VERBS = ["planted", "repaired", "painted", "carried", "studied", "cooked", "cleaned", "measured", "sold", "borrowed",
          "described", "discovered"]
_OBJECTS = ["a wooden fence", "the red bicycle", "three baskets of apples", "an old map", "the village bridge",
            "a loaf of bread", "the school garden", "a broken clock", "two heavy boxes", "the river path",
            "a small boat", "the market stall"]
_PLACES = ["near the harbour", "behind the church", "in the valley", "at the market", "by the old mill",
           "on the hill", "in the town square", "beside the lake"]
_TIMES = ["on Monday morning", "after the storm", "before sunrise", "during the festival", "late in the evening",
          "in early spring", "at noon", "last winter"]
_TOPICS = {
    "weather": ["The sky was grey and the wind came from the north.", "Rain fell softly on the roofs all afternoon.",
                "By evening the clouds had cleared and the stars appeared.", "It was the warmest day of the year."],
    "cooking": ["Mix the flour with water and a pinch of salt.", "Let the dough rest for one hour before baking.",
                "Slice the onions thinly and fry them until golden.", "Serve the soup hot with fresh bread."],
    "travel": ["The train left the station exactly on time.", "We followed the coast road for many miles.",
               "The inn at the crossroads had a warm fire.", "At the border the guards checked our papers."],
    "garden": ["Tomatoes need sun, water and patience.", "Pull the weeds before they go to seed.",
               "The roses bloomed along the southern wall.", "Compost makes the soil dark and rich."],
}


def general_document(rng: random.Random) -> str:
    topic = rng.choice(sorted(_TOPICS))
    sentences = []
    for _ in range(rng.randint(3, 6)):
        if rng.random() < 0.5:
            sentences.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                             f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}.")
        else:
            sentences.append(rng.choice(_TOPICS[topic]))
    return " ".join(sentences)


def general_documents(num_documents: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [general_document(rng) for _ in range(num_documents)]


def write_jsonl(path: str, texts: list[str], field: str = "text") -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, field: text}) + "\n")
    os.replace(tmp, path)
