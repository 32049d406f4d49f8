"""The LAMBADA-style cloze task: deterministic passages, no answer in the prompt, and lm-eval's
scores equal to the model's own likelihoods computed here independently."""

import statistics

import pytest
import torch

from lrc.errors import ConfigError
from lrc.eval.cloze import ClozeTask, cloze_examples
from lrc.eval.zeroshot import ZeroShotBenchmark


class Text:
    """A text source over fixed documents (what EmbeddedText / TextFile give the builder)."""

    def __init__(self, documents):
        self._documents = documents

    def documents(self):
        return list(self._documents)

    def describe(self):
        return {"source": "test"}


def nonce_documents(sentences=40, seed=0):
    """Sentences of common words, each ending in a word that occurs nowhere else in the text."""
    gen = torch.Generator().manual_seed(seed)
    common = "the river ran past an old mill while farmers carried grain along narrow roads".split()
    docs, k = [], 0
    for _ in range(2):
        parts = []
        for _ in range(sentences // 2):
            n = int(torch.randint(6, 14, (1,), generator=gen))
            words = [common[int(i)] for i in torch.randint(len(common), (n,), generator=gen)]
            parts.append(" ".join(words).capitalize() + f" zq{chr(97 + k % 26)}{chr(97 + k // 26)}x.")
            k += 1
        docs.append("\n".join(parts))  # line breaks inside a document are plain spaces
    return docs


def test_builder_is_deterministic_and_never_puts_the_answer_in_the_prompt():
    docs = nonce_documents()
    first, again = cloze_examples(docs, context_words=20), cloze_examples(list(docs), context_words=20)
    assert first == again and len(first) >= 30
    flat = [" ".join(d.split()) for d in docs]
    for e in first:
        assert e.target.startswith("zq") and e.target not in e.context  # each nonce word occurs once
        assert any(e.context + " " + e.target + "." in text for text in flat)  # exactly the text before it
        assert len(e.context.split()) >= 20 and not e.context.endswith(" ")


def test_targets_end_pieces_and_follow_the_options():
    text = ("Alpha beta gamma delta, epsilon zeta eta theta; iota kappa lambda sigma. Nu xi omicron rho "
            "tau. Upsilon phi chi psi omega it.")
    sentence = cloze_examples([text], context_words=4, boundaries="sentence")
    clause = cloze_examples([text], context_words=4, boundaries="clause")
    assert [e.target for e in sentence] == ["sigma", "tau"]  # "it" is shorter than min_word_chars
    assert [e.target for e in clause] == ["theta", "sigma", "tau"]  # "delta" has 3 words before it
    assert clause[0].context == "Alpha beta gamma delta, epsilon zeta eta"  # whole pieces back to 4 words
    assert clause[1].context == "epsilon zeta eta theta; iota kappa lambda"
    assert sentence[0].context == "Alpha beta gamma delta, epsilon zeta eta theta; iota kappa lambda"
    assert [e.target for e in cloze_examples([text], context_words=4, min_word_chars=2)][-1] == "it"
    assert cloze_examples([text], context_words=4, limit=2) == [clause[0], clause[1]]  # 0 and 3 // 2
    assert cloze_examples([text] * 3, context_words=4, limit=3) == [clause[0]] * 3  # one from each copy
    repeated = "The cat sat on the mat near the dog. A bird flew over the cat."
    assert [e.target for e in cloze_examples([repeated], context_words=6, recall=True)] == ["cat"]
    assert [e.target for e in cloze_examples([repeated], context_words=6)] == ["dog", "cat"]


def test_a_target_is_a_whole_word_never_the_tail_of_a_token():
    text = ("One two three four five calls object.__eq__(self, other). Then it raises hit_except. "
            "Six seven eight nine ten said self—revelation. And finally a plain ending word.")
    assert [e.target for e in cloze_examples([text], context_words=4)] == ["word"]
    loose = text.replace("(self,", "( self,")  # a word after a space is a word again
    assert [e.target for e in cloze_examples([loose], context_words=4)] == ["self", "word"]


def test_real_text_passages_are_verbatim_and_the_default_suite_builds():
    from lrc.data.sources import EmbeddedText, PythonDocs

    for source in (EmbeddedText("test"), PythonDocs()):
        flat = [" ".join(d.split()) for d in source.documents()]
        examples = cloze_examples(source.documents(), context_words=30, limit=400)
        assert len(examples) == 400 or source == EmbeddedText("test")
        for e in examples:  # the scored text is in the source exactly: no part of the answer in the prompt
            assert any(e.context + " " + e.target in text for text in flat), e


def test_cloze_config_errors_name_the_value():
    from conftest import compose

    from lrc.config.build import build_benchmarks

    with pytest.raises(ConfigError, match="cloze.embedded: source='foo' is not a text source"):
        build_benchmarks(compose(["benchmark=offline", "benchmark.zeroshot.cloze.embedded.source=foo"]))
    with pytest.raises(ConfigError, match="boundaries='page'"):
        build_benchmarks(compose(["benchmark=offline", "benchmark.zeroshot.cloze.embedded.boundaries=page"]))
    with pytest.raises(ConfigError, match="no clause end with 5000 words"):  # before any model is loaded
        build_benchmarks(compose(["benchmark=offline", "benchmark.zeroshot.cloze.embedded.context_words=5000"]))
    kept = build_benchmarks(compose(["benchmark=offline", "benchmark.zeroshot.cloze.pydocs=null"]))[1]
    assert [c.task_name for c in kept.cloze] == ["lrc_cloze_embedded"]


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match="boundaries='paragraph'"):
        ClozeTask(Text(["x"]), boundaries="paragraph")
    with pytest.raises(ConfigError, match="context_words=0"):
        ClozeTask(Text(["x"]), context_words=0)
    with pytest.raises(ConfigError, match="no clause end with 50 words"):
        ClozeTask(Text(["Too short."])).examples()


def continuation_logprobs(model, tokenizer, context, continuation):
    """(sum of log p(continuation tokens | context), whether greedy decoding reproduces them),
    computed from the model's logits directly (byte tokenizer: context + continuation split cleanly)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits.double(), -1)[0, len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), target].sum()), bool((logp.argmax(-1) == target).all())


def test_cloze_scores_equal_an_independent_computation(tiny):
    task = ClozeTask(Text(nonce_documents(sentences=24)), name="nonce", context_words=12, limit=16)
    metrics = ZeroShotBenchmark(cloze=(task,), batch_size=4).run(tiny.model, tiny.tokenizer)
    scored = [continuation_logprobs(tiny.model, tiny.tokenizer, e.context, " " + e.target) for e in task.examples()]
    lls, greedy = [s[0] for s in scored], [float(s[1]) for s in scored]
    assert metrics["lm_eval/lrc_cloze_nonce/word_logprob"] == pytest.approx(statistics.mean(lls), rel=1e-4)
    assert metrics["lm_eval/lrc_cloze_nonce/word_logprob_stderr"] == pytest.approx(
        statistics.stdev(lls) / len(lls) ** 0.5, rel=1e-3)
    assert metrics["lm_eval/lrc_cloze_nonce/acc"] == statistics.mean(greedy)
    assert metrics["lm_eval/lrc_cloze_nonce/chance"] == 0.0  # exact match of a free continuation
    assert metrics["lm_eval/mean_acc_above_chance"] == metrics["lm_eval/lrc_cloze_nonce/acc"]
