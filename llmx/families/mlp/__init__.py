"""The seed example: a two-layer MLP binary classifier, the smallest family built on the recipe contract."""
