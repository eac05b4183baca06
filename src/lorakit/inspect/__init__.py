"""`lorakit inspect`: plan an adapter before training (`plan`), look inside one after (`analysis`, `keys`)."""

from .analysis import (LayerAnalysis, analyze_adapter, analyze_model, effective_rank, format_analysis, plot_analysis,
                       rank_above, singular_values)
from .cli import register_cli
from .keys import KeyValueMap, format_key_values, key_value_maps, plot_key_values
from .plan import (SHAPES, ModelShape, Plan, base_weight_bytes, format_plan, plan, resolve_shape, scale_overhead_bits,
                   shape_from_config, trainable_count)

__all__ = [
    "SHAPES", "KeyValueMap", "LayerAnalysis", "ModelShape", "Plan", "analyze_adapter", "analyze_model",
    "base_weight_bytes", "effective_rank", "format_analysis", "format_key_values", "format_plan", "key_value_maps",
    "plan", "plot_analysis", "plot_key_values", "rank_above", "register_cli", "resolve_shape", "scale_overhead_bits",
    "shape_from_config", "singular_values", "trainable_count",
]
