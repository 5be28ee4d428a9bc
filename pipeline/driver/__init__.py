"""The driver process's steps, as pipeline.run calls them: plan (validate, units, checkpoint,
lease), execute (units -> parts, through an executor), finish (rank, publish, clean up)."""
