"""kdexp's Hydra sweeper plugin `fused` (hydra/sweeper=fused); see fused_sweeper.py."""
