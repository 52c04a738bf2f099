"""Statistics over units (CLT features, MLP neurons, residual-stream dimensions, SAE
latents), whatever produced their activations: activation sources and streamed summaries
(``activations``), cross-language overlap (``overlap``), language specificity
(``specificity``), language probes (``probe``), the token and span language classifier
(``language``), logit lift (``lift``), parallel text sets (``parallel``) and top activating
examples (``examples``)."""
