"""`clusterlm convert` and `clusterlm export`: Hugging Face folders <-> clusterlm checkpoints.

    clusterlm convert --from-hf ./gpt2 --out runs/gpt2          # config.json + *.safetensors + tokenizer.json
    clusterlm export runs/gpt2 --format hf --out ./gpt2-export  # loads with transformers' from_pretrained

`export` writes the tokenizer of every kind (byte, char, bpe) as tokenizer.json +
tokenizer_config.json + special_tokens_map.json, which transformers' AutoTokenizer loads with the same
ids (docs/interop.md lists what differs); byte and char also get clusterlm_tokenizer.json, which
`convert` reads first.
"""

from __future__ import annotations

import argparse

from clusterlm.interop.hf_io import convert_from_hf, export_to_hf


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="clusterlm convert",
                                 description="Hugging Face GPT-2 / Llama / RoBERTa-PreLayerNorm (masked LM) / MBart folder "
                                             "-> clusterlm checkpoint")
    ap.add_argument("--from-hf", required=True, metavar="DIR",
                    help="folder with config.json, model.safetensors (or a sharded index) and tokenizer.json "
                         "(or clusterlm_tokenizer.json, read first)")
    ap.add_argument("--out", required=True, metavar="CKPT", help="run directory to create (CKPT/checkpoints/...)")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="allow reading pytorch_model.bin (a pickle) when there is no safetensors file")
    args = ap.parse_args(argv)
    path = convert_from_hf(args.from_hf, args.out, trust_pickle=args.trust_pickle)
    print(f"wrote {path}")
    return 0


def export_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="clusterlm export", description="clusterlm checkpoint -> Hugging Face folder")
    ap.add_argument("ckpt", metavar="CKPT", help="run directory, checkpoints folder or step folder")
    ap.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: transformers folder)")
    ap.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    args = ap.parse_args(argv)
    out = export_to_hf(args.ckpt, args.out)
    print(f"wrote {out}")
    return 0
