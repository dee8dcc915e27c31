"""The tenant side: backends to the frozen model, memory caching, the CLI and the Flower client."""
