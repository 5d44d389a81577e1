"""`clusterlm ensemble RUN RUN ... --out DIR`: several classifiers of one recipe written as one
checkpoint that answers with the mean of their class probabilities (clusterlm.models.ensemble).

    clusterlm finetune sst2_lstm_cpu --train.seed=2 --train.out_dir=runs/s2     # ... one run per seed
    clusterlm ensemble runs/s1337 runs/s2 runs/s3 runs/s4 --out runs/sst2_ensemble
    clusterlm eval runs/sst2_ensemble --task ../shared/data/sst2/dev.tsv
    clusterlm serve runs/sst2_ensemble          # POST /classify, like one classifier

The members must be classifiers of one model config (the same recipe at different seeds: a
different shape, pooling or dropout is named and refused), trained with the same tokenizer
(tokenizer.json's SHA-256) and labels in the same order, with float weights (not quantized). A
LoRA fine-tune counts as its merged weights. Each member is read once, verified against its
manifest; the ensemble is written the way every checkpoint is (a hidden folder, fsynced, manifest
last, then renamed): out/checkpoints/step-N with N the largest member step, the first member's
config.toml and tokenizer, and ensemble.json naming the members and their manifests' SHA-256.

Why: a small classifier's seed-to-seed spread is often as wide as any setting's effect, and
averaging removes part of it (SST-2: six seeds averaged score 1.0-2.0 points above their members'
mean, 82.45-84.17% over three sets of seeds; docs/finetune.md).
Cost: N forward passes per request. `finetune.distill_from` turns an ensemble into one model of a
member's size (it takes an ensemble checkpoint as a teacher too).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from clusterlm.errors import ConfigError

log = logging.getLogger(__name__)


def _member(arg: str) -> object:
    """The LoadedModel of classifier checkpoint `arg`, or a CheckpointError/ConfigError naming it."""
    from clusterlm.checkpoint.model_io import load_for_inference

    if not Path(arg).exists():
        raise ConfigError(f"ensemble member {arg!r} does not exist; give a classifier's run, checkpoints or step folder")
    loaded = load_for_inference(arg)
    if loaded.ensemble is not None:
        raise ConfigError(f"{loaded.path} is already an ensemble of {loaded.ensemble['members']}; name its members "
                          f"({', '.join(map(str, loaded.ensemble.get('sources', [])))}) instead")
    if not loaded.config.model.labels:
        raise ConfigError(f"{loaded.path} is a language model (no model.labels); an ensemble averages the class "
                          "probabilities of classifiers (clusterlm finetune with finetune.task = 'classify')")
    if loaded.quantization is not None:
        raise ConfigError(f"{loaded.path} is quantized ({loaded.quantization['method']}); combine the float "
                          "checkpoints")
    return loaded


def _differences(a: object, b: object) -> list[str]:
    """`model.KEY=a vs b` for each ModelConfig field where the two members differ."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"model.{k}={da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k]]


def _check_same(first: object, m: object) -> None:
    """Refuse member `m` unless it has `first`'s model config and tokenizer."""
    from clusterlm.fsutil import sha256_file

    diffs = _differences(first.config.model, m.config.model)
    if diffs:
        raise ConfigError(f"{m.path} is not the same model as {first.path}: {'; '.join(diffs[:4])}; an "
                          "ensemble's members share one model config (the same recipe at other seeds)")
    if sha256_file(m.path / "tokenizer.json") != sha256_file(first.path / "tokenizer.json"):
        raise ConfigError(f"{m.path} was trained with another tokenizer than {first.path}; the members read the "
                          "same token ids: train them on the same data.dir (or data.tokenizer)")


def write_ensemble(members: list[str], out: str | Path) -> Path:
    """Combine classifier checkpoints `members` into out/checkpoints/step-N; returns the step folder."""
    from clusterlm.checkpoint.store import MANIFEST, check_outside_checkpoints, save_checkpoint
    from clusterlm.fsutil import sha256_file
    from clusterlm.models.ensemble import ClassifierEnsemble

    if len(members) < 2:
        raise ConfigError(f"an ensemble needs at least 2 classifiers, got {len(members)}")
    if not str(out).strip():  # Path("") is the working folder: its checkpoints/ would be written there
        raise ConfigError("--out='' is empty; give a folder for the ensemble, e.g. runs/my_ensemble")
    out = Path(out)
    if (out / "checkpoints").exists():
        raise ConfigError(f"{out}/checkpoints already exists; choose a new --out")
    check_outside_checkpoints(out)  # and a file in the way or an unwritable folder: before the members are read
    loaded: list = []
    for arg in members:
        m = _member(arg)
        if any(m.path.resolve() == x.path.resolve() for x in loaded):
            raise ConfigError(f"{m.path} is given twice; each member is another training run")
        if loaded:
            _check_same(loaded[0], m)
        loaded.append(m)
    first = loaded[0]
    model = ClassifierEnsemble([m.model for m in loaded])
    info = first.info
    ensemble = {"members": len(loaded), "combine": "mean of the members' class probabilities",
                "sources": [str(m.path) for m in loaded],
                "manifest_sha256": [sha256_file(m.path / MANIFEST) for m in loaded]}
    step = max(m.info.step for m in loaded)
    path = save_checkpoint(out / "checkpoints", step, model_state=model.state_dict(), optimizer_state=None,
                           train_state={"step": step, "ensemble_of": ensemble["sources"]},
                           config_toml=info.config_toml, tokenizer_path=info.tokenizer_path, ensemble=ensemble)
    log.info("wrote an ensemble of %d classifiers (%s) -> %s", len(loaded), ", ".join(first.config.model.labels), path)
    return path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="clusterlm ensemble",
                                 description="combine classifiers of one recipe (other seeds) into one checkpoint "
                                             "that answers with the mean of their class probabilities")
    ap.add_argument("members", nargs="+", metavar="CKPT",
                    help="classifier runs, checkpoints folders or step folders (at least 2)")
    ap.add_argument("--out", required=True, metavar="DIR", help="run directory to create (DIR/checkpoints)")
    args = ap.parse_args(argv)
    path = write_ensemble(args.members, args.out)
    print(f"wrote {path}")
    return 0
