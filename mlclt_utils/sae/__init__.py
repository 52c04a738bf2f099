"""Sparse autoencoders (SAEs) on the residual stream, trained with SAELens's own classes (``train``)."""
