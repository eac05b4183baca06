"""The adapter core: configs, deltas (LoRA, VeRA), the adapted layer (with DoRA), target matching, model-level
operations, combining adapters, modules_to_save and LoRA+ groups. It knows nothing of quantization or file formats:
a quantized base is just another weight provider (`base.py`)."""
