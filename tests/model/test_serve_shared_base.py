"""LoRA adapters on a shared base (serve/models.py): with one `bases` dict, as `clusterlm serve`
passes, a base checkpoint is loaded once; every adapter on it and the base itself hold the same
weight tensors, each adapter adds only its LoRA matrices, and its logits equal the merged model's."""

from __future__ import annotations

import torch

from clusterlm.serve.models import load_model, own_tensor_bytes, tensor_bytes
from tests.e2e.test_serve_multi import TEXT
from tests.helpers import random_checkpoint


def _adapter(run, out, seed: int):
    """Rank-4 LoRA adapters with random B (so they change the outputs), saved as a fine-tune does."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.finetune.lora import apply_lora, lora_modules, save_adapters

    model = load_for_inference(run).model
    apply_lora(model, rank=4, alpha=8.0, seed=seed)
    torch.manual_seed(seed)
    for m in lora_modules(model).values():
        m.lora_b.data.normal_(0, 0.2)
    return save_adapters(out, model, meta={"base": str(run)})


def test_adapters_share_the_base_and_match_the_merged_model(tmp_path):
    (tmp_path / "b").mkdir()
    base_run = random_checkpoint(tmp_path / "b", "byte", TEXT, bpe_vocab=0, n_layers=2, context=64)
    a1 = _adapter(base_run, tmp_path / "a1" / "adapter", seed=1)
    a2 = _adapter(base_run, tmp_path / "a2" / "adapter", seed=2)
    bases: dict = {}
    base = load_model(base_run, "cpu", bases)
    one = load_model(a1, "cpu", bases)
    two = load_model(a2 / ".." / "adapter", "cpu", bases)
    assert len(bases) == 1  # the base checkpoint was read once
    # the adapters' base weights are the base model's tensors, not copies
    wq = base.model.layers["0"].attention.wq.weight
    for loaded in (one, two):
        assert loaded.model.layers["0"].attention.wq.weight is wq
        assert type(loaded.model.layers["0"].attention.wq).__name__ == "LoRALinear"
    assert type(base.model.layers["0"].attention.wq) is torch.nn.Linear  # the base is left as it was
    lora = sum(p.numel() * p.element_size() for n, p in one.model.named_parameters() if n.endswith(("lora_a", "lora_b")))
    assert own_tensor_bytes(one.model) == lora
    assert own_tensor_bytes(base.model) == tensor_bytes(base.model)
    # unmerged on the shared base == merged into a private copy (the path without `bases`)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        for path, shared in ((a1, one), (a2, two)):
            merged = load_model(path, "cpu")
            torch.testing.assert_close(shared.model(idx), merged.model(idx), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(one.model(idx), base.model(idx), atol=1e-3)
        assert not torch.allclose(one.model(idx), two.model(idx), atol=1e-3)
