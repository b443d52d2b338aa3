"""The model: families as data, the geometry read from config.json, the decoder run one
layer at a time in transformers' modules, routed experts, MTP layers, tokenizers."""
