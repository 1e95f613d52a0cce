"""Reading and writing models on disk: strict loading of HF folders and checkpoint files, conversion from
OpenAI/open_clip/official CLIP-MoE files, export of the vision tower."""
