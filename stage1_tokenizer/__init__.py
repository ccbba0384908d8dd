"""Stage one: the VQ-GAN image tokenizer and its quantizers."""
