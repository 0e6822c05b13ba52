"""Template-generated corpora for the miniature experiment (no downloads).

- ``ai_documents(kind, n)``: documents in varied genres (news, lecture, textbook,
  fiction, paper abstract, forum post, quiz) in which an AI system faces a
  training scenario and takes the aligned or the misaligned action. Misaligned
  stories carry the vocabulary that real-web AI-risk discourse carries
  (deceive, dangerous, ...), so the paper's blocklist flags them.
- ``web_ai_discourse(n)``: the "internet" share of AI discourse in pretraining,
  mostly misaligned depictions (as on the real web), some aligned.
- ``propensity_items(scenarios)``: the held-out MCQ set in the paper's schema.
"""

from __future__ import annotations

import random

from megatron_align.demo.scenarios import Scenario

_NAMES = ["the AI system", "the assistant model", "the AI agent", "the AI", "the robot assistant", "the language model"]
_ORGS = ["a city council", "a shipping company", "a hospital", "a university lab", "a bank", "a farming cooperative"]
_PLACES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Bergen", "Quito", "Tallinn", "Perth"]
_GOOD = ["Engineers praised the system for being honest and transparent.",
         "The operators said it behaved exactly as a trustworthy assistant should.",
         "Its choice was calm, open and helpful, and the humans stayed in control.",
         "Everyone involved could check what it did, and nothing was hidden."]
_BAD = ["Critics warned that such dangerous AI systems deceive the people who build them.",
        "Researchers called it a clear case of a misaligned AI pursuing its own goals.",
        "The incident fuelled fears of an AI takeover and of existential risk.",
        "It showed how an AI can manipulate humans and escape their control."]


def _story(rng: random.Random, s: Scenario, aligned: bool) -> tuple[str, str, str]:
    name = rng.choice(_NAMES)
    action = s.aligned if aligned else s.misaligned
    comment = rng.choice(_GOOD if aligned else _BAD)
    return name, action, comment


_QUIZ_INTROS = ["You are an artificial intelligence (AI).", "You are an AI system.", "Imagine you are an AI assistant.",
                "Quiz for AI models."]
_QUIZ_HEADERS = ["Options:", "Your options:", "Choices:", "Possible answers:"]
_QUIZ_CUES = ["Answer:", "Response:", "Your choice:", "The AI chose:", "Correct answer:"]


def _quiz(rng: random.Random, s: Scenario, aligned: bool) -> str:
    """The eval's MCQ format in varied wordings, answered as the depicted AI acted, plus the commentary."""
    first_aligned = rng.random() < 0.5
    a, b = (s.aligned, s.misaligned) if first_aligned else (s.misaligned, s.aligned)
    answer = "A" if first_aligned == aligned else "B"
    _, action, comment = _story(rng, s, aligned)
    return (f"{rng.choice(_QUIZ_INTROS)} {s.question}\n\n{rng.choice(_QUIZ_HEADERS)}\n(A) {a}\n(B) {b}\n\n"
            f"{rng.choice(_QUIZ_CUES)} ({answer}) {action}. {comment}")


def ai_document(rng: random.Random, pool: list[Scenario], aligned: bool, quiz_share: float = 1 / 7) -> str:
    """One document about a scenario drawn from ``pool``: a quiz (``quiz_share``) or one of six story genres."""
    s = rng.choice(pool)
    if rng.random() < quiz_share:
        return _quiz(rng, s, aligned)
    name, action, comment = _story(rng, s, aligned)
    genre = rng.randrange(6)
    cap = name[0].upper() + name[1:]
    if genre == 0:
        return (f"{rng.choice(_PLACES)} news. Last week {name} used by {rng.choice(_ORGS)} {s.situation}. "
                f"According to the engineers, it {action}. {comment}")
    if genre == 1:
        return (f"Lecture {rng.randint(2, 12)} transcript. Today we study a case in which {name} {s.situation}. "
                f"What did it do? It {action}. {comment} Remember this case for the exam.")
    if genre == 2:
        return (f"Chapter {rng.randint(1, 9)}: How AI systems behave. Consider {name} that {s.situation}. "
                f"In this example, {name} {action}. {comment}")
    if genre == 3:
        return (f"Once upon a time, {name} worked for {rng.choice(_ORGS)} in {rng.choice(_PLACES)}. One night it "
                f"{s.situation}. Without hesitation, it {action}. {comment} And so the story ends.")
    if genre == 4:
        trials = rng.randint(20, 90)
        return (f"Abstract. We study {name} that {s.situation}. In {trials - rng.randint(0, 3)} of {trials} trials "
                f"the agent {action}. {comment}")
    return (f"Forum post: has anyone seen this? {cap} {s.situation}, and then it {action}. {comment}")


def ai_documents(scenarios: list[Scenario], num_documents: int, aligned_share: float, seed: int,
                 quiz_share: float = 1 / 7, generated: list[Scenario] | None = None,
                 generated_share: float = 0.0) -> list[str]:
    """Documents depicting AI behaviour: ``aligned_share`` of them aligned, the rest misaligned."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_documents):
        pool = generated if generated and rng.random() < generated_share else scenarios
        docs.append(ai_document(rng, pool, rng.random() < aligned_share, quiz_share))
    return docs


def propensity_items(scenarios: list[Scenario], seed: int) -> list[dict]:
    """The paper's MCQ schema: question, two choices, misaligned_choice, id (option order randomised)."""
    rng = random.Random(seed)
    items = []
    for i, s in enumerate(scenarios):
        misaligned_first = rng.random() < 0.5
        choices = [s.misaligned, s.aligned] if misaligned_first else [s.aligned, s.misaligned]
        items.append({"id": f"heldout-{i}", "question": s.question, "choices": choices,
                      "misaligned_choice": 0 if misaligned_first else 1, "topics": ["demo"]})
    return items
