"""hacbo-jax: budget-controlled full fine-tuning of language models in JAX."""
