"""Vision-language sparse upcycling (the paper's LLaVA-style pipeline): model, presets, data, stages,
evaluation. See docs/vlm.md."""
