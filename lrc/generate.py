"""``python -m lrc.generate <checkpoint> "prompt"``: a quick look at a compressed model's text.

Reads an lrc checkpoint (:func:`lrc.model.checkpoint.load_compressed`) or, without a rank plan,
any transformers model folder (a merged checkpoint). Greedy decoding unless ``--sample``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lrc.errors import DataError, LrcError
from lrc.model.checkpoint import PLAN_FILE, load_compressed
from lrc.model.loading import resolve_device


def generate(path: str | Path, prompt: str, max_new_tokens: int = 40, sample: bool = False, chat: bool = False,
             device: str = "auto", seed: int = 0) -> str:
    dev = resolve_device(device)
    if not Path(path).is_dir():
        raise DataError(f"{str(path)!r} is not a directory (an lrc checkpoint or a transformers model folder)")
    if (Path(path) / PLAN_FILE).is_file():
        model, tokenizer = load_compressed(path, device=dev)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path).eval().to(dev)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer is None:
        raise LrcError(f"{path}: the checkpoint has no tokenizer")
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt").to(dev)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=sample,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrc.generate", description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        print(generate(args.path, args.prompt, args.max_new_tokens, args.sample, args.chat, args.device))
    except LrcError as exc:
        print(f"lrc: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
