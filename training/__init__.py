"""Offline half of swissroll-diffusion: data, schedules, network, training loop, checkpoint export."""
