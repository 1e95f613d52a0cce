"""Applications built on the library: the demo, text-to-image search, pretraining a CLIP from scratch."""
