"""Model families: one package each (model, checkpoint formats, recipe, evaluation)."""
