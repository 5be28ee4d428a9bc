"""The run's steps, as pipeline.run calls them: plan (validate, units, checkpoint, lease), execute
(units -> parts, through an executor), finish (rank, publish, clean up); progress, signals and the
startup timeline."""
