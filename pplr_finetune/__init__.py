"""pplr_finetune package."""
