"""`python -m nanollama_jax.train`: the training command (cli.py), apart from the loop it runs."""

from nanollama_jax import cli

cli.run()
