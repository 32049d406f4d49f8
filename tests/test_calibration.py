import json

import pytest
import torch

from lrc.data.sources import EMBEDDED_SPLITS, EmbeddedText, HFDataset, TextFile, embedded_chunks
from lrc.data.windows import Calibration, held_out_windows, sample_document_windows, sample_windows, tokenize
from lrc.errors import ConfigError, DataError
from lrc.model.loading import byte_tokenizer


def test_embedded_splits_are_disjoint_and_cover_the_corpus():
    chunks = {split: EmbeddedText(split).chunks() for split in EMBEDDED_SPLITS}
    assert len(chunks["calibration"]) > 2 * len(chunks["test"]) > 0 and chunks["validation"]
    assert all(len("".join(c)) > 20_000 for c in chunks.values())
    everything = embedded_chunks()
    assert sorted(c for part in chunks.values() for c in part) == sorted(everything)  # a partition
    from importlib import resources

    corpus = resources.files("lrc").joinpath("data", "britannica_1911_shakespeare.txt").read_text()
    assert sum(len(c) for c in everything) > 0.98 * len(corpus)
    # no sentence is shared between calibration and test
    cal = {s for c in chunks["calibration"] for s in c.split(". ") if len(s) > 40}
    assert not cal & {s for c in chunks["test"] for s in c.split(". ") if len(s) > 40}


def test_unknown_split_is_clear():
    with pytest.raises(ConfigError, match="split='train'"):
        EmbeddedText("train").text()


def test_windows_are_deterministic_per_seed():
    ids = torch.arange(1000)
    a, b = sample_windows(ids, 8, 32, seed=3), sample_windows(ids, 8, 32, seed=3)
    assert torch.equal(a, b) and a.shape == (8, 32)
    assert not torch.equal(a, sample_windows(ids, 8, 32, seed=4))
    # each window is a contiguous slice of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 31, dtype=torch.long))


def test_text_shorter_than_one_window_is_a_clear_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("too short")
    calib = Calibration(source=TextFile(str(path)), nsamples=2, seqlen=64)
    with pytest.raises(DataError, match=r"9 tokens, shorter than one window of seqlen=64"):
        calib.windows(byte_tokenizer())


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TextFile(str(tmp_path / "nope.txt")).text()


def test_text_folder_reads_every_txt(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert TextFile(str(tmp_path)).text() == "first\n\nsecond"


@pytest.mark.parametrize("nsamples, seqlen", [(0, 8), (2, 1), (2.5, 8)])
def test_bad_sizes_are_clear(nsamples, seqlen):
    with pytest.raises(ConfigError):
        sample_windows(torch.arange(100), nsamples, seqlen, 0)


def test_hf_dataset_stream_windows_on_local_wikitext_format(tmp_path):
    """The WikiText-2 path (load_dataset + join with blank lines + random windows) on local files."""
    rows = [{"text": line} for line in [" = Title = \n", "", " Some text about things . \n"] * 50]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    source = HFDataset(path="json", name=None, split="train", data_files=str(path))
    assert source.text() == "\n\n".join(r["text"] for r in rows)
    tok = byte_tokenizer()
    windows = Calibration(source=source, nsamples=4, seqlen=16, seed=0).windows(tok)
    stream = tokenize(tok, source.text())
    for w in windows:  # every window occurs in the joined stream
        assert any(torch.equal(stream[i:i + 16], w) for i in range(stream.numel() - 15))


def test_document_windows_c4_style(tmp_path):
    docs = ["short"] * 20 + [f"a long enough document number {i} " * 4 for i in range(5)]
    path = tmp_path / "c4.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "url": "x"}) for d in docs))
    source = HFDataset(path="json", name=None, split="train", data_files=str(path))
    tok = byte_tokenizer()
    calib = Calibration(source=source, nsamples=6, seqlen=24, seed=1, sampling="documents")
    windows = calib.windows(tok)
    assert windows.shape == (6, 24)
    long_docs = [tokenize(tok, d) for d in docs if len(d) > 24]
    for w in windows:
        assert any(any(torch.equal(ids[i:i + 24], w) for i in range(ids.numel() - 23)) for ids in long_docs)
    assert torch.equal(windows, calib.windows(tok))


def test_document_windows_error_when_no_document_is_long_enough():
    with pytest.raises(DataError, match="longer than seqlen=50"):
        sample_document_windows(["tiny"] * 3, byte_tokenizer(), 2, 50, 0, max_draws=100)


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot load dataset"):
        HFDataset(path="json", name=None, data_files=str(tmp_path / "missing.jsonl")).documents()


def test_embedded_identity_follows_the_split_text(monkeypatch):
    """Cache keys must change when the split's text changes, even if the corpus file does not."""
    import lrc.data.sources as calibration

    before = EmbeddedText("test").describe()
    monkeypatch.setattr(calibration, "SPLIT_PATTERN", ("calibration", "test", "test", "calibration", "validation"))
    assert EmbeddedText("test").describe() != before


@pytest.mark.parametrize("opts, match", [({"nsamples": 0}, "nsamples=0"), ({"seqlen": 1}, "seqlen=1"),
                                         ({"sampling": "random"}, "sampling='random'"),
                                         ({"batch_size": 0}, "batch_size=0")])
def test_calibration_options_are_checked_on_construction(opts, match):
    with pytest.raises(ConfigError, match=match):
        Calibration(source=EmbeddedText("calibration"), **opts)


def test_held_out_windows_never_overlap_calibration_windows():
    ids = torch.arange(10_000)  # every position is its own token, so overlap is visible
    windows = sample_windows(ids, 40, 64, seed=0)
    taken = [(int(w[0]), 64) for w in windows]  # token id = position
    held = held_out_windows(ids, taken, 20, 64, seed=0)
    assert held.shape == (20, 64)
    used = set(windows.flatten().tolist())
    assert not used & set(held.flatten().tolist())
    assert torch.equal(held, held_out_windows(ids, taken, 20, 64, seed=0))
    with pytest.raises(DataError, match="disjoint from the calibration windows"):
        held_out_windows(ids[:700], taken[:5], 20, 64, seed=0)


def test_validation_windows_come_from_the_validation_source(tmp_path):
    tok = byte_tokenizer()
    cal = Calibration(EmbeddedText("calibration"), nsamples=2, seqlen=64, validation=EmbeddedText("validation"))
    windows = cal.validation_windows(tok, 3, 64)
    text = tokenize(tok, EmbeddedText("validation").text())
    for w in windows:  # every window is a slice of the validation split
        assert (text.unfold(0, 64, 1) == w).all(1).any()
    path = tmp_path / "t.txt"
    path.write_text("word " * 3000)
    plain = Calibration(TextFile(str(path)), nsamples=2, seqlen=64)
    assert plain.validation_windows(tok, 3, 64).shape == (3, 64)  # held-out tiles of the same text
    with pytest.raises(ConfigError, match="need calibration.validation"):
        Calibration(TextFile(str(path)), nsamples=2, seqlen=64, sampling="documents").validation_windows(tok, 3, 64)


def alphabet_file(tmp_path, name: str, alphabet: str, n: int = 4000, seed: int = 0) -> TextFile:
    """A text whose every byte comes from ``alphabet`` (so a window's source is visible)."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(alphabet), (n,), generator=gen).tolist()
    path = tmp_path / f"{name}.txt"
    path.write_text("".join(alphabet[i] for i in picks))
    return TextFile(str(path))


def source_of(window: torch.Tensor) -> str:
    chars = set(byte_tokenizer().decode(window.tolist()))
    return "letters" if chars <= set("abcdefgh") else "digits" if chars <= set("0123456789") else "mixed"


def test_mixture_honours_weights_and_interleaves(tmp_path):
    from lrc.data.mixture import Mixture

    tok = byte_tokenizer()
    mix = Mixture({"letters": alphabet_file(tmp_path, "l", "abcdefgh"),
                   "digits": alphabet_file(tmp_path, "d", "0123456789")}, weights={"letters": 3, "digits": 1})
    windows = Calibration(mix, nsamples=10, seqlen=32, seed=5).windows(tok)
    origin = [source_of(w) for w in windows]
    assert origin.count("letters") == 8 and origin.count("digits") == 2  # 7.5 / 2.5: the tie goes to the first
    assert origin == ["letters"] * 2 + ["digits"] + ["letters"] * 4 + ["digits"] + ["letters"] * 2  # spread out
    assert mix.counts(16) == {"letters": 12, "digits": 4}
    assert Mixture(mix.components, {"letters": 1, "digits": 1e-9}).counts(7) == {"letters": 7, "digits": 0}


def test_mixture_windows_are_deterministic_and_each_component_draws_alone(tmp_path):
    from lrc.data.mixture import Mixture, component_seed
    from lrc.files import cache_key

    tok = byte_tokenizer()
    letters, digits = alphabet_file(tmp_path, "l", "abcdefgh"), alphabet_file(tmp_path, "d", "0123456789")
    mix = Mixture({"letters": letters, "digits": digits})
    a = Calibration(mix, nsamples=6, seqlen=32, seed=1).windows(tok)
    assert torch.equal(a, Calibration(mix, nsamples=6, seqlen=32, seed=1).windows(tok))
    assert not torch.equal(a, Calibration(mix, nsamples=6, seqlen=32, seed=2).windows(tok))
    # a component's windows are those it gives alone with its own seed, whatever else is mixed in
    alone = Calibration(digits, nsamples=3, seqlen=32, seed=component_seed(1, "digits")).windows(tok)
    assert torch.equal(torch.stack([w for w in a if source_of(w) == "digits"]), alone)
    assert mix.describe()["weights"] == {"letters": 1.0, "digits": 1.0}
    # the identity (statistics cache key) follows the order the windows are interleaved in
    swapped = Mixture({"digits": digits, "letters": letters})
    assert not torch.equal(a, Calibration(swapped, nsamples=6, seqlen=32, seed=1).windows(tok))
    assert cache_key(swapped.describe()) != cache_key(mix.describe())
    assert cache_key(Mixture({"letters": letters, "digits": digits}, {"letters": 2, "digits": 1}).describe()) != \
        cache_key(mix.describe())
    with pytest.raises(ConfigError, match=r"nsamples=1 gives components \['digits'\] no window"):
        Calibration(mix, nsamples=1, seqlen=32).windows(tok)


@pytest.mark.parametrize("weights, match", [({"letters": 1}, "weights name"), ({"letters": 1, "digits": -1},
                                            "digits=-1"), ({"letters": 1, "digits": "x"}, "digits='x'")])
def test_mixture_bad_weights_are_clear(tmp_path, weights, match):
    from lrc.data.mixture import Mixture

    with pytest.raises(ConfigError, match=match):
        Mixture({"letters": alphabet_file(tmp_path, "l", "ab"), "digits": alphabet_file(tmp_path, "d", "01")}, weights)


def test_mixture_needs_an_explicit_validation_source(tmp_path):
    from lrc.data.mixture import Mixture

    tok = byte_tokenizer()
    mix = Mixture({"letters": alphabet_file(tmp_path, "l", "abcdefgh")})
    with pytest.raises(ConfigError, match="calibration.validation"):
        Calibration(mix, nsamples=2, seqlen=32).validation_windows(tok, 2, 32)
    held_out = Mixture({"digits": alphabet_file(tmp_path, "d", "0123456789")})
    scored = Calibration(mix, nsamples=2, seqlen=32, validation=held_out).validation_windows(tok, 2, 32)
    assert [source_of(w) for w in scored] == ["digits", "digits"]


def test_text_folder_pattern_reads_each_file_once(tmp_path):
    (tmp_path / "GPL-3").write_text("three")
    (tmp_path / "Apache").write_text("apache")
    (tmp_path / "GPL").symlink_to(tmp_path / "GPL-3")
    assert TextFile(str(tmp_path), pattern="*").text() == "apache\n\nthree"
    with pytest.raises(DataError, match="no files matching '\\*.txt'"):
        TextFile(str(tmp_path)).text()
