"""The pipeline that samples token grids with the prior and decodes them with the tokenizer."""
