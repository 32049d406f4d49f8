"""A LAMBADA-style cloze task from any text lrc can read: predict a passage's final word.

LAMBADA (Paperno et al., 2016) asks a model for the last word of a passage, given the
passage before it, and scores exact match of the greedy continuation plus the word's
log-likelihood. lrc builds such passages deterministically from a text source (the embedded
test split by default, any ``TextFile`` too), so the task needs no download:

* every sentence end (``boundaries=sentence``, LAMBADA's) or also every clause end before
  a comma, colon or semicolon (``boundaries=clause``, the default: the embedded test split
  has 124 sentence ends with 50 words of context before them, 357 clause ends) whose last
  word is alphabetic and at least ``min_word_chars`` long is a candidate target (its
  closing punctuation dropped, as in LAMBADA);
* its context is the whole pieces (sentences or clauses) before it, back to at least
  ``context_words`` words, plus its own piece up to the target: exactly the text before the
  target word (trailing space stripped), so no part of the answer is in the prompt;
* ``recall=True`` keeps only targets that occur earlier in the context (as a word), the
  property that makes LAMBADA's words guessable from the passage; the context's own final
  word is never the target itself.

The model is scored by lm-eval's loglikelihood request (context, " " + word), as its lambada tasks are: ``acc`` is 1
when greedy decoding reproduces the word's tokens exactly, ``word_logprob`` the word's log-
likelihood in nats (both means, with lm-eval's standard errors). Chance is 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lrc.errors import ConfigError
from lrc.eval.tasks import in_memory_task

# a piece's end: a word, its closing punctuation (optionally a closing quote), then space or the end
# (the word starts the text or follows a space: never the tail of a longer token such as a__b)
ENDS = {"sentence": re.compile(r"(?<!\S)([A-Za-z][A-Za-z'\-]*)([.!?][\"')\]]?)(?=\s|$)"),
        "clause": re.compile(r"(?<!\S)([A-Za-z][A-Za-z'\-]*)([.!?;:,][\"')\]]?)(?=\s|$)")}
WORD = re.compile(r"[A-Za-z]+")
BUILDER_VERSION = 2  # part of describe(), so cached dense metrics of other examples are never reused


@dataclass(frozen=True)
class ClozeExample:
    context: str
    target: str


def cloze_examples(documents: list[str], context_words: int = 50, min_word_chars: int = 3,
                   recall: bool = False, limit: int | None = None, boundaries: str = "clause") -> list[ClozeExample]:
    """The cloze examples of ``documents``, in text order (deterministic; see the module doc)."""
    examples = []
    for document in documents:
        text = " ".join(document.split())  # one line: newlines and runs of spaces as one space
        ends = list(ENDS[boundaries].finditer(text))
        starts = [0] + [m.end() + 1 for m in ends]  # where each sentence begins
        for i, match in enumerate(ends):
            target = match.group(1)
            if not WORD.fullmatch(target) or len(target) < min_word_chars:
                continue
            j = i  # take whole sentences before the target's until the context is long enough
            while j > 0 and len(text[starts[j]:match.start(1)].split()) < context_words:
                j -= 1
            context = text[starts[j]:match.start(1)].rstrip()
            if len(context.split()) < context_words:
                continue
            if recall and target.lower() not in {w.lower() for w in WORD.findall(context)}:
                continue
            examples.append(ClozeExample(context=context, target=target))
    if limit is not None and len(examples) > limit:  # evenly spaced over the whole text
        examples = [examples[i * len(examples) // limit] for i in range(limit)]
    return examples


def process_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval hook: exact match of the greedy continuation and the target's log-likelihood."""
    loglikelihood, is_greedy = results[0]
    return {"acc": float(is_greedy), "word_logprob": float(loglikelihood)}


@dataclass(frozen=True)
class ClozeTask:
    """A cloze task named ``lrc_cloze_<name>`` over ``source`` (any lrc text source)."""

    source: Any
    name: str = "embedded"
    context_words: int = 50
    min_word_chars: int = 3
    recall: bool = False
    boundaries: str = "clause"
    limit: int | None = None  # examples, evenly spaced over the text (None: every candidate)
    _examples: list[ClozeExample] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        what = f"benchmark.zeroshot.cloze.{self.name}"
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ConfigError(f"cloze: name={self.name!r} must be letters, digits and underscores")
        for key in ("context_words", "min_word_chars"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{what}: {key}={getattr(self, key)!r} must be a positive integer")
        if self.boundaries not in ENDS:
            raise ConfigError(f"{what}: boundaries={self.boundaries!r} is not one of {sorted(ENDS)}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"{what}: limit={self.limit!r} must be a positive integer or null")

    @property
    def task_name(self) -> str:
        return f"lrc_cloze_{self.name}"

    def examples(self) -> list[ClozeExample]:
        if not self._examples:
            built = cloze_examples(self.source.documents(), self.context_words, self.min_word_chars,
                                   self.recall, self.limit, self.boundaries)
            if not built:
                raise ConfigError(f"benchmark.zeroshot.cloze.{self.name}: the text has no {self.boundaries} end "
                                  f"with {self.context_words} words of context before it and a target word "
                                  f"of {self.min_word_chars}+ letters{' seen before' if self.recall else ''}")
            self._examples.extend(built)
        return list(self._examples)

    def describe(self) -> dict[str, Any]:
        return {"task": self.task_name, "builder": BUILDER_VERSION, "source": self.source.describe(),
                "context_words": self.context_words,
                "min_word_chars": self.min_word_chars, "recall": self.recall, "boundaries": self.boundaries,
                "limit": self.limit}

    def lm_eval_task(self) -> Any:
        """This task as an lm-eval ConfigurableTask (its dataset built in memory)."""
        mean = {"aggregation": "mean", "higher_is_better": True}
        return in_memory_task(
            [{"context": e.context, "target": e.target} for e in self.examples()], task=self.task_name,
            output_type="loglikelihood", doc_to_text="{{context}}", doc_to_target="{{' ' + target}}",
            process_results=process_results,
            metric_list=[{"metric": "acc", **mean}, {"metric": "word_logprob", **mean}])
