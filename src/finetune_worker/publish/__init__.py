"""After training: the evaluation against the base model, the LoRA merge, the model card and the Hub push."""
