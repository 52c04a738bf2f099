"""Statistics over units (CLT features, MLP neurons, SAE latents): top examples today;
firing sets, overlap, language specificity and probes as chapters 04-05 add them."""
