"""Online half of swissroll-diffusion: loads a checkpoint and serves samples, trajectories and animations."""
