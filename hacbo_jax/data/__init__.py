"""Training data: GSM8K and the prompt format (``gsm8k``), other row formats (``formats``),
synthetic tasks (``synthetic``), packing into fixed-length rows (``packing``), the micro-dev
buffer (``microdev``), the tokenizer (``tokenizer``) and answer grading (``exact_match``)."""
