"""Quantized frozen bases: the NF4 codebook, NF4Weight and NF4Linear (`nf4`), and the quantization pass (`quantize`)."""
