"""One contrastive training loop for every phase, its losses, batch samplers and the distributed helpers."""
