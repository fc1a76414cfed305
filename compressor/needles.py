"""Needle-in-a-haystack prompts built from local text: a planted number the model must repeat.

A case is a haystack (consecutive tokens of a text file, from an offset drawn from the seed) with
one needle sentence, "The special magic number is NNNNNNN.", planted at a relative depth, and a
question at the end whose greedy continuation should be the number. Everything is drawn from one
seed, so a suite is reproducible from its record. The same cases serve the evaluation
(`compressor.evaluate.needle_suite`) and the filter-layer probe (on calibration text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from compressor.errors import CompressorError

NEEDLE = " The special magic number is {number}. "
QUESTION = "\n\nWhat is the special magic number mentioned in the text above? The special magic number is"


@dataclass
class NeedleCase:
    length: int  # tokens in the whole prompt
    depth: float  # where the needle starts, as a fraction of the haystack
    answer: str  # the planted number
    input_ids: torch.Tensor  # (length,)
    answer_span: tuple[int, int]  # token positions [start, end) of the number itself


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_case(tokenizer, haystack: list[int], length: int, depth: float, number: int, offset: int) -> NeedleCase:
    """One prompt of exactly `length` tokens with the needle at `depth` of the haystack part."""
    prefix = tokenize(tokenizer, NEEDLE.split("{number}")[0])
    needle = tokenize(tokenizer, NEEDLE.format(number=number))
    question = tokenize(tokenizer, QUESTION)
    body = length - len(needle) - len(question)
    if body < 1:
        raise CompressorError(f"needle prompt of {length} tokens is too short for the needle and the question")
    if offset + body > len(haystack):
        raise CompressorError(f"haystack has {len(haystack)} tokens, fewer than the {offset + body} a "
                              f"{length}-token prompt needs")
    hay = haystack[offset:offset + body]
    at = round(depth * body)
    ids = hay[:at] + needle + hay[at:] + question
    number_tokens = len(tokenize(tokenizer, NEEDLE.format(number=number).rstrip(". "))) - len(prefix)
    answer_start = at + len(prefix)
    return NeedleCase(length, depth, str(number), torch.tensor(ids),
                      (answer_start, answer_start + number_tokens))


def build_cases(tokenizer, haystack_text: str, lengths: list[int], depths: list[float], per_cell: int,
                seed: int) -> list[NeedleCase]:
    """`per_cell` cases for every length x depth, with numbers and haystack offsets drawn from `seed`."""
    haystack = tokenize(tokenizer, haystack_text)
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        if length > len(haystack):
            raise CompressorError(f"haystack text has {len(haystack)} tokens, fewer than the needle length {length}")
        for depth in depths:
            for _ in range(per_cell):
                number = rng.randint(1_000_000, 9_999_999)
                offset = rng.randint(0, len(haystack) - length)
                cases.append(build_case(tokenizer, haystack, length, depth, number, offset))
    return cases


def even_depths(count: int) -> list[float]:
    """`count` depths spread over the haystack, from 0.05 to 0.95."""
    if count == 1:
        return [0.5]
    return [round(0.05 + 0.9 * i / (count - 1), 4) for i in range(count)]
