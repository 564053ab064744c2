"""Benchmark workloads as token ids (see shared/BENCHMARKS.md for where each one comes from).

A workload is a sequence of *waves*: the requests of one wave are submitted together, and the next
wave starts when the previous one has finished (multi-turn needs the previous answers to build the
next round). Prompts are random ids from a seeded generator in ``[10, 4000)``: inside every shape's
vocabulary and clear of the tokenizer's special tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from promptcache.sequences import common_prefix_len

TOKEN_LOW, TOKEN_HIGH = 10, 4000  # plain (non-special) ids of the shipped 4096-id tokenizer


class TokenSource:
    """Deterministic random token ids: the same seed gives the same prompts in every arm and engine."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def take(self, num_tokens: int) -> list[int]:
        return [self._rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(num_tokens)]


@dataclass(frozen=True)
class BenchRequest:
    name: str  # stable across arms ("g2-q5"): outputs are compared by name
    prompt_ids: list[int]
    max_tokens: int


class Workload:
    """Waves of requests; ``wave(i, outputs)`` may read the answers of earlier waves (by name)."""

    name = "workload"

    def num_waves(self) -> int:
        raise NotImplementedError

    def wave(self, index: int, outputs: dict[str, list[int]]) -> list[BenchRequest]:
        raise NotImplementedError

    def params(self) -> dict[str, int | str]:
        raise NotImplementedError


class SharedPrefix(Workload):
    """G groups, each a system prompt of P tokens shared by N questions of Q tokens; O output tokens.

    One wave, ordered question-major (q0 of every group, then q1, ...), as a burst at an infinite
    request rate: the first request of each group computes its prefix, the others reuse it.
    """

    name = "shared-prefix"

    def __init__(self, groups: int = 4, questions: int = 8, prefix_tokens: int = 2048,
                 question_tokens: int = 64, output_tokens: int = 16, seed: int = 0) -> None:
        self.groups, self.questions = groups, questions
        self.prefix_tokens, self.question_tokens, self.output_tokens = prefix_tokens, question_tokens, output_tokens
        src = TokenSource(seed)
        self._prefixes = [src.take(prefix_tokens) for _ in range(groups)]
        self._questions = [[src.take(question_tokens) for _ in range(questions)] for _ in range(groups)]

    def num_waves(self) -> int:
        return 1

    def wave(self, index: int, outputs: dict[str, list[int]]) -> list[BenchRequest]:
        return [
            BenchRequest(f"g{g}-q{q}", self._prefixes[g] + self._questions[g][q], self.output_tokens)
            for q in range(self.questions)
            for g in range(self.groups)
        ]

    def params(self) -> dict[str, int | str]:
        return {"groups": self.groups, "questions": self.questions, "prefix_tokens": self.prefix_tokens,
                "question_tokens": self.question_tokens, "output_tokens": self.output_tokens}


class MultiTurn(Workload):
    """U users, R rounds: round r sends the user's whole history plus a new question of Q tokens.

    Every history starts with the same system prompt; a round's answer (O tokens, greedy) is
    appended to that user's history before the next round, so round r + 1 extends round r. Where a
    server returns text but no token ids, a seeded stand-in of O tokens takes the answer's place.
    """

    name = "multi-turn"

    def __init__(self, users: int = 4, rounds: int = 5, prefix_tokens: int = 512,
                 question_tokens: int = 128, output_tokens: int = 32, seed: int = 0) -> None:
        self.users, self.rounds = users, rounds
        self.prefix_tokens, self.question_tokens, self.output_tokens = prefix_tokens, question_tokens, output_tokens
        src = TokenSource(seed)
        self._system = src.take(prefix_tokens)
        self._questions = [[src.take(question_tokens) for _ in range(rounds)] for _ in range(users)]
        self._standins = [[src.take(output_tokens) for _ in range(rounds)] for _ in range(users)]

    def num_waves(self) -> int:
        return self.rounds

    def wave(self, index: int, outputs: dict[str, list[int]]) -> list[BenchRequest]:
        wave = []
        for u in range(self.users):
            history = list(self._system)
            for r in range(index):
                history += self._questions[u][r] + (outputs.get(f"u{u}-r{r}") or self._standins[u][r])
            prompt = history + self._questions[u][index]
            wave.append(BenchRequest(f"u{u}-r{index}", prompt, self.output_tokens))
        return wave

    def params(self) -> dict[str, int | str]:
        return {"users": self.users, "rounds": self.rounds, "prefix_tokens": self.prefix_tokens,
                "question_tokens": self.question_tokens, "output_tokens": self.output_tokens}


class LongDoc(Workload):
    """D documents of L tokens, each asked K times (a question of Q tokens after the document).

    One request per wave, so the order decides the reuse distance: ``tile`` asks each document K
    times in a row, ``interleave`` cycles through all documents K times (reuse needs D documents of
    KV to stay resident).
    """

    name = "long-doc"
    ORDERS = ("tile", "interleave")

    def __init__(self, documents: int = 4, doc_tokens: int = 4096, asks: int = 3, question_tokens: int = 32,
                 output_tokens: int = 8, order: str = "tile", seed: int = 0) -> None:
        if order not in self.ORDERS:
            raise ValueError(f"unknown long-doc order {order!r}; use one of {', '.join(self.ORDERS)}")
        self.documents, self.doc_tokens, self.asks, self.order = documents, doc_tokens, asks, order
        self.question_tokens, self.output_tokens = question_tokens, output_tokens
        src = TokenSource(seed)
        self._docs = [src.take(doc_tokens) for _ in range(documents)]
        self._questions = [[src.take(question_tokens) for _ in range(asks)] for _ in range(documents)]
        pairs = [(d, k) for d in range(documents) for k in range(asks)]
        self._order = pairs if order == "tile" else sorted(pairs, key=lambda p: (p[1], p[0]))

    def num_waves(self) -> int:
        return len(self._order)

    def wave(self, index: int, outputs: dict[str, list[int]]) -> list[BenchRequest]:
        d, k = self._order[index]
        return [BenchRequest(f"d{d}-k{k}", self._docs[d] + self._questions[d][k], self.output_tokens)]

    def params(self) -> dict[str, int | str]:
        return {"documents": self.documents, "doc_tokens": self.doc_tokens, "asks": self.asks,
                "question_tokens": self.question_tokens, "output_tokens": self.output_tokens,
                "order": self.order}


def ideal_cached_tokens(waves: list[list[tuple[list[int], list[int]]]]) -> list[list[int]]:
    """Prompt tokens an unbounded, token-exact cache would reuse, per request of each wave.

    ``waves[w][i]`` is (prompt, output) of request i of wave w. A request can reuse the longest
    prefix it shares with anything computed before it: the prompts *and* answers of earlier waves
    (an answer's last token never ran, so its K/V does not exist), and the prompts submitted ahead
    of it in its own wave. The last prompt token always runs, to produce logits.
    """
    seen: list[list[int]] = []
    result = []
    for wave in waves:
        this_wave: list[list[int]] = []
        ideal = []
        for prompt, _ in wave:
            best = max((common_prefix_len(prompt, s) for s in seen + this_wave), default=0)
            ideal.append(min(best, len(prompt) - 1))
            this_wave.append(prompt)
        seen += [prompt + output[:-1] for prompt, output in wave]
        result.append(ideal)
    return result
