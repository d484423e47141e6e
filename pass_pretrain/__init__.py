"""pass_pretrain package."""
