"""Files lorakit reads and writes: PEFT adapter directories (`peft`), quantized model directories (`quantized`), and the
JSON and atomic-write helpers they share (`files`). Only JSON and safetensors are read: nothing is ever unpickled."""
