"""The maths training and the service share: noise schedules, prediction targets, samplers, checkpoint format."""
