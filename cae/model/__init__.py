"""The model: a torch-free plan of a CAE's layers (shapes, parameters, latent size, checked
with integer arithmetic), the ``torch.nn`` module built from it, and its memory estimate."""
