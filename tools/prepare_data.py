"""Write a Megatron indexed dataset (.bin/.idx) from text / JSONL files, or prepare the embedded corpus.

python -m tools.prepare_data --embedded                       # stdlib corpus into the cache
python -m tools.prepare_data data/*.jsonl --tokenizer tok.model --output data/web
python -m tools.prepare_data docs/ --vocab-size 8192 --output data/docs   # trains data/docs.model too
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.corpus import prepare_embedded
from launcher.errors import RampError, require
from launcher.indexing import expand_inputs, iter_documents, total_bytes, write_indexed_dataset
from launcher.tokenizer import MODEL_TYPES, load_tokenizer, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ramp-prepare-data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("inputs", nargs="*", help="text files (one document each), .jsonl files, or directories")
    p.add_argument("--embedded", action="store_true", help="prepare the default stdlib corpus (cached)")
    p.add_argument("--output", "-o", type=Path, help="dataset prefix: writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", type=Path, help="sentencepiece .model; default: train PREFIX.model")
    p.add_argument("--vocab-size", type=int, default=4096, help="when training a tokenizer (or --embedded)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe", help="when training a tokenizer")
    p.add_argument(
        "--cache-dir", type=Path, default=Path(".cache/ramp"), help="with --embedded (data.cache_dir)"
    )
    p.add_argument("--text-key", default="text", help="the JSONL field that holds the document")
    p.add_argument("--ext", default=None, help="in directories, only these suffixes, e.g. .py,.jsonl")
    p.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes; default: the available cores"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.embedded:
            require(not args.inputs, "--embedded takes no input files")
            model, prefix = prepare_embedded(
                args.cache_dir, args.vocab_size, workers=args.workers, progress=not args.quiet
            )
            print(f"tokenizer: {model}\ndataset prefix: {prefix}")
            return 0
        require(bool(args.inputs), "give input files or directories, or --embedded")
        require(args.output is not None, "--output PREFIX is required")
        files = expand_inputs(args.inputs, args.ext.split(",") if args.ext else None)
        if args.tokenizer is not None:
            tok = load_tokenizer(args.tokenizer)
        else:
            tok = train_tokenizer(
                iter_documents(files, args.text_key),
                args.output.with_name(args.output.name + ".model"),
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                total_bytes=total_bytes(files),
            )
        stats = write_indexed_dataset(
            files, tok, args.output, text_key=args.text_key, workers=args.workers, progress=not args.quiet
        )
    except RampError as e:
        print(f"ramp-prepare-data: error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer: {tok.path}\ndataset prefix: {stats.prefix}\n{stats.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
