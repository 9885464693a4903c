"""Turns a SchedulerOutput into tensors, runs the model and the sampler, returns a RunnerOutput."""
