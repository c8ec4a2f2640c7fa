"""LoRA fine-tuning shared by every model family: data formats, chat-template tokenization with
prompt masking, training (transformers Trainer + PEFT), inference with an adapter, merging."""
