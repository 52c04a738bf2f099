"""Cross-layer transcoders (CLTs): the model, activation collection, training, evaluation,
quality targets and file formats.

``model`` holds the ``CrossLayerTranscoder`` (JumpReLU, TopK or BatchTopK; cross-layer or
per-layer decoders) with a sparse CPU training path; ``activations`` collects MLP inputs
and outputs from a TransformerLens model and streams them through a bounded shuffling
buffer; ``train`` is the training loop (single process or torchrun); the stage that trains a run's
CLT is in ``mlclt_utils.stages``.
"""

from .model import CLTConfig, CrossLayerTranscoder

__all__ = ["CLTConfig", "CrossLayerTranscoder"]
