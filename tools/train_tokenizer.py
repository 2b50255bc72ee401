"""Train a lossless sentencepiece tokenizer on text / JSONL files.

python -m tools.train_tokenizer data/ --output tok/code.model --vocab-size 8192 --model-type bpe
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.errors import RampError
from launcher.indexing import expand_inputs, iter_documents, total_bytes
from launcher.tokenizer import MODEL_TYPES, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ramp-train-tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="text files (one document each), .jsonl files, or directories")
    p.add_argument("--output", "-o", required=True, type=Path, help="the .model file to write")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="map unseen characters to <unk> (lossy) instead of UTF-8 byte pieces",
    )
    p.add_argument("--sample-mb", type=float, default=8.0, help="cap on the text sampled for training")
    p.add_argument("--text-key", default="text", help="the JSONL field that holds the document")
    p.add_argument("--ext", default=None, help="in directories, only these suffixes, e.g. .py,.jsonl")
    p.add_argument("--threads", type=int, default=None, help="default: the available cores")
    p.add_argument("--seed", type=int, default=0, help="seed of the document sample")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files = expand_inputs(args.inputs, args.ext.split(",") if args.ext else None)
        tok = train_tokenizer(
            iter_documents(files, args.text_key),
            args.output,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            byte_fallback=args.byte_fallback,
            sample_bytes=int(args.sample_mb * 1e6),
            total_bytes=total_bytes(files),
            seed=args.seed,
            threads=args.threads,
        )
    except RampError as e:
        print(f"ramp-train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"{tok.path} ({args.model_type}, vocab {tok.vocab_size}, eod {tok.eod}) from {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
