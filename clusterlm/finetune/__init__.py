"""Fine-tuning. Built so far: LoRA adapters (clusterlm.finetune.lora; docs/finetune.md)."""

from clusterlm.finetune.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapters,
    lora_state_dict,
    merge_lora,
    reset_adapters,
    save_adapters,
)

__all__ = ["DEFAULT_TARGETS", "LoRALinear", "apply_lora", "count_parameters", "load_adapters", "lora_state_dict",
           "merge_lora", "reset_adapters", "save_adapters"]
