"""How much of full fine-tuning's gain a rank-r update can hold: full fine-tuning's weight update,
truncated by SVD to rank r on LoRA's target matrices, scored like the LoRA arm (issue 15's "LoRA
within 2 BLEU of full fine-tuning").

    python benchmarks/lora_rank_ceiling.py --base W/lm --full W/full          # translate-lora's --work W
    python benchmarks/lora_rank_ceiling.py --base W/lm --full W/full --ranks 8 32 --limit 200

For each target matrix (default the LoRA arm's: wq wv w1 w2 and the tied token embedding) the update
D = W_full - W_base is replaced by its best rank-r approximation (the top r singular triplets,
Eckart-Young), every other parameter stays at the base's, and the model is scored with greedy BLEU
on test_2016_flickr. Rows:
  base                    the base alone;
  full                    full fine-tuning as trained;
  targets, full rank      every target matrix moved by its whole update, the rest at the base
                          (what LoRA on these matrices could reach with unlimited rank);
  targets, rank r         the same with each update truncated to rank r (an adapter of rank r that
                          learned exactly full fine-tuning's top directions);
  all matrices, rank r    every 2-D parameter truncated to rank r, vectors (norms) moved in full;
  all but GROUP           full fine-tuning's whole update except one group of parameters (GROUPS),
                          left at the base's: how much of the gain that group carries.
Also the share of each update's energy (sum of squared singular values) in its top r directions.
If "targets, rank 8" scores near the LoRA arm, the rank is what caps LoRA, not its training; if far
above, a better-trained rank-8 adapter could do more. (The truncation is not the best rank-r update
for the loss, only for the weights: a trained adapter may find a better one.)
Writes benchmarks/results/lora_rank_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import check_checkpoint, machine, positive_int, refuse, write_result

from clusterlm.checkpoint.model_io import load_for_inference
from clusterlm.eval.harness import DecodeOptions, resolve_task, run_task

GROUPS = {"wq wk wv": ["wq", "wk", "wv"], "wo": ["wo"], "w1 w2 (MLP)": ["w1", "w2", "w3"],
          "embeddings (token + tied output, positions)": ["tok_embeddings", "pos_embeddings"],
          "norms": ["attention_norm", "ffn_norm", "norm"]}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
OUT = Path(__file__).parent / "results" / "lora_rank_ceiling.json"


def truncate(d: torch.Tensor, r: int) -> tuple[torch.Tensor, float]:
    """The best rank-r approximation of d and the share of d's energy it keeps."""
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    kept = float((s[:r] ** 2).sum() / (s ** 2).sum()) if float(s.sum()) > 0 else 1.0
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(d.dtype), kept


def is_target(name: str, targets: list[str]) -> bool:
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name  # layers.0.attention.wq.weight -> wq
    return leaf in targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the base run or checkpoint (translate-lora's W/lm)")
    p.add_argument("--full", required=True, help="the full fine-tuning run or checkpoint (W/full)")
    p.add_argument("--data", default=str(SHARED), help="Multi30k folder with test_2016_flickr.en.gz and .XX.gz")
    p.add_argument("--pair", default="fr")
    p.add_argument("--ranks", type=positive_int, nargs="+", default=[8, 16, 64])
    p.add_argument("--targets", nargs="+", default=["wq", "wv", "w1", "w2", "tok_embeddings"])
    p.add_argument("--limit", type=int, default=0, help="test sentences (0 = all 1,000)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    files = [Path(args.data) / f"test_2016_flickr.{x}.gz" for x in ("en", args.pair)]
    if not all(f.is_file() for f in files):
        refuse(f"Multi30k test files not found: {', '.join(map(str, files))}; pass --data DIR "
               "(../shared/data/multi30k in this workplace; research use only, never bundled)")
    check_checkpoint("--base", args.base)
    check_checkpoint("--full", args.full)
    task = resolve_task(",".join(map(str, files)), limit=args.limit or None)
    base, full = load_for_inference(args.base), load_for_inference(args.full)
    b_sd, f_sd = base.model.state_dict(), full.model.state_dict()
    if b_sd.keys() != f_sd.keys() or any(b_sd[k].shape != f_sd[k].shape for k in b_sd):
        raise SystemExit(f"{args.base} and {args.full} are not the same model shape: not a base and its fine-tuning")
    model = full.model
    decode = DecodeOptions(max_new_tokens=64)
    rows: list[dict] = []

    def score(label: str, sd: dict[str, torch.Tensor], **extra: object) -> None:
        for k in tied:  # one Parameter under two names: the embedding's value is the one that counts
            sd = {**sd, k: sd["tok_embeddings.weight"]}
        model.load_state_dict(sd)
        t0 = time.perf_counter()
        metrics, _ = run_task(model, full.tokenizer, task, batch_size=64, decode=decode, progress=False)
        rows.append({"variant": label, "bleu": round(metrics["bleu"], 2), "chrf": round(metrics.get("chrf", 0.0), 2),
                     "n": metrics.get("n"), "eval_s": round(time.perf_counter() - t0, 1), **extra})
        print(json.dumps(rows[-1]), flush=True)

    tied = {k for k in f_sd if k.endswith("output.weight") and "tok_embeddings.weight" in f_sd
            and f_sd[k].data_ptr() == f_sd["tok_embeddings.weight"].data_ptr()}
    # copies: state_dict() holds the model's own tensors, which every score() below overwrites
    b_sd, f_sd = ({k: v.detach().clone() for k, v in sd.items()} for sd in (b_sd, f_sd))
    names = [k for k in b_sd if not torch.equal(b_sd[k], f_sd[k]) and b_sd[k].is_floating_point() and k not in tied]
    mats = [k for k in names if f_sd[k].dim() == 2]
    target_mats = [k for k in mats if is_target(k, args.targets)]
    if not target_mats:
        raise SystemExit(f"no changed 2-D parameter matches --targets {args.targets}; changed: {mats}")
    score("base", b_sd)
    score("full", f_sd)
    score("targets, full rank", {**b_sd, **{k: f_sd[k] for k in target_mats}})
    # which parameters carry the gain: full fine-tuning's update with one group left at the base's
    for group, leaves in GROUPS.items():
        kept = {k: f_sd[k] for k in names if not is_target(k, leaves)}
        score(f"all but {group}", {**b_sd, **kept})
    energy: dict[str, dict[str, float]] = {}
    vectors = {k: f_sd[k] for k in names if f_sd[k].dim() != 2}  # norms: moved in full in the "all matrices" rows
    for r in args.ranks:
        cut = {k: truncate(f_sd[k] - b_sd[k], r) for k in mats}
        energy[str(r)] = {k: round(v[1], 4) for k, v in cut.items()}
        score(f"targets, rank {r}", {**b_sd, **{k: b_sd[k] + cut[k][0] for k in target_mats}})
        score(f"all matrices, rank {r}", {**b_sd, **vectors, **{k: b_sd[k] + cut[k][0] for k in mats}})
    doc = {"benchmark": "lora_rank_ceiling", "machine": machine(), "base": str(base.path), "full": str(full.path),
           "pair": f"en-{args.pair}",
           "targets": args.targets, "target_matrices": target_mats, "rows": rows,
           "energy_kept_by_rank": energy,
           "energy_kept_mean_over_targets": {r: round(sum(e[k] for k in target_mats) / len(target_mats), 4)
                                             for r, e in energy.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("rows", "energy_kept_mean_over_targets")}, indent=1))


if __name__ == "__main__":
    main()
