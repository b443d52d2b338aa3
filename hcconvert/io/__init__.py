"""Reading and writing checkpoints: config, index and safetensors headers (local or over
HTTP), lazy tensors, quantized storage formats, the shard writer, staging and publishing."""
