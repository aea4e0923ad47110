"""The multi-task VLM: the language model and its visual side (vlm.py, language_model.py, tokenizer.py, encoders.py)."""
