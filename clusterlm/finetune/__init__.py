"""Fine-tuning (docs/finetune.md): `clusterlm finetune RECIPE` trains with a [finetune] section.
LoRA adapters (lora.py), the base model and the model transform (setup.py), the prepared data
(data.py; the records and loader are clusterlm.data.sft), a classifier's validation (evaluate.py)."""

from clusterlm.finetune.lora import (
    DEFAULT_TARGETS,
    LoRAEmbedding,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapters,
    lora_state_dict,
    merge_lora,
    reset_adapters,
    save_adapters,
)

__all__ = ["DEFAULT_TARGETS", "LoRAEmbedding", "LoRALinear", "apply_lora", "count_parameters", "load_adapters", "lora_state_dict",
           "merge_lora", "reset_adapters", "save_adapters"]
