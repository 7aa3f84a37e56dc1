"""The check printed at the end of a fine-tune: does the model now give the answers it was taught?

A training loss near zero can hide a model that still answers wrongly (greedy decoding from a prompt is not teacher
forcing), and a loss alone says nothing to someone who wanted facts learned. So after training, herd asks the tuned
model the questions of `--eval` (all of them), or, with no eval data, of a seeded sample of the training rows (nothing
is withheld from training for it), greedily, and counts exact answers.

An answer is exact when the reply equals the reference assistant message once case, punctuation, spacing and commas
inside numbers are set aside; a row with an "answers" list (accepted answers, as in examples/zephyrine) counts when
the reply contains one of them as whole words.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from herd.train.data import read_rows


@dataclass
class Question:
    prompt: list[dict]  # the messages before the last assistant message
    reference: str  # that message's content
    answers: list[str] | None = None
    tools: list | None = None


@dataclass
class AnswerCheck:
    source: str  # "eval data" or "a sample of the training prompts"
    asked: int = 0
    exact: int = 0
    graded: list[tuple[str, str, bool]] = field(default_factory=list)  # (question, reply, exact)

    def line(self) -> str:
        if not self.asked:
            return f"exact answers: none checked ({self.source} has no chat rows ending in an assistant text)"
        return f"exact answers: {self.exact}/{self.asked} ({self.exact / self.asked:.0%}) on {self.source}"


def normalize(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())  # 9,600 -> 9600
    return " ".join(re.sub(r"[^\w\s']", " ", text).split())


def is_exact(reply: str, reference: str, answers: list[str] | None = None) -> bool:
    """The reply equals the reference, or contains one of the accepted answers as whole words (see module doc)."""
    if answers:
        r = f" {normalize(reply)} "
        return any(f" {normalize(a)} " in r for a in answers)
    return normalize(reply) == normalize(reference)


def questions(paths) -> list[Question]:
    """One question per chat row whose last message is an assistant text: the dialog before it is the prompt."""
    if isinstance(paths, (str, bytes)) or not isinstance(paths, (list, tuple)):
        paths = [paths]
    out = []
    for path in paths:
        for row, _where in read_rows(path):
            msgs = row.get("messages")
            if not msgs or msgs[-1]["role"] != "assistant" or not isinstance(msgs[-1].get("content"), str):
                continue
            answers = row.get("answers")
            answers = [str(a) for a in answers] if isinstance(answers, list) and answers else None
            out.append(Question(msgs[:-1], msgs[-1]["content"], answers, row.get("tools")))
    return out


def sample(items: list, k: int, seed: int) -> list:
    """k items drawn with a fixed seed (all of them when there are no more than k)."""
    if len(items) <= k:
        return list(items)
    return random.Random(seed).sample(items, k)


@torch.no_grad()
def check_answers(llm, items: list[Question], source: str, batch: int = 16) -> AnswerCheck:
    """Greedy replies of the model to every question, graded; the model is left in eval mode."""
    llm.model.eval()
    res = AnswerCheck(source)
    tok = llm.tokenizer
    for k in range(0, len(items), batch):
        chunk = items[k:k + batch]
        # room for the reference and a little more: a reply that runs on past it is not exact anyway
        longest = max(len(tok.encode(q.reference, bos=False, eos=False)) for q in chunk)
        groups: dict[int, list[int]] = {}  # tools differ per row: generate each tools group together
        for j, q in enumerate(chunk):
            groups.setdefault(id(q.tools) if q.tools else 0, []).append(j)
        replies = [""] * len(chunk)
        for idx in groups.values():
            outs = llm.generate_batch([chunk[j].prompt for j in idx], tools=chunk[idx[0]].tools,
                                      max_tokens=min(256, longest + 8), temperature=0.0)
            for j, c in zip(idx, outs):
                replies[j] = c.text
        for q, reply in zip(chunk, replies):
            ok = is_exact(reply, q.reference, q.answers)
            res.asked += 1
            res.exact += ok
            res.graded.append((q.prompt[-1].get("content") or "", reply.strip(), ok))
    return res
