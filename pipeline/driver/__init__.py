"""The driver process's steps, as pipeline.run calls them: plan (inputs, output, units, the model
resolved, checkpoint and lease; each layer asked once), execute (pick the executor, hand it the
units, record each as it lands, verify the records), finish (chunk scores, rank, publish, clean
up, the summary's counts)."""
