"""The paper's model side: layers, backbones, the encoder-decoder, data, losses, metrics, training
and inference. The operators themselves live in the top-level ``kernels`` package."""
