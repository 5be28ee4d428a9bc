"""The driver process's steps, as pipeline.run calls them: plan (validate, units, checkpoint,
lease), execute (pick the executor, hand it the units, record each as it lands), finish (rank,
publish, clean up)."""
