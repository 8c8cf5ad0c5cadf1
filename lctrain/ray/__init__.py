"""Ray cluster jobs: ``lctrain submit`` sends a run to a Ray cluster, where a Ray Train ``TorchTrainer`` runs
lctrain's one training function (``lctrain.train.loop.train``) on every worker.

    lctrain.ray.jobs        the client side: token, job submission (JobSubmissionClient), following logs, status/stop
    lctrain.ray.entrypoint  the job's entrypoint on the cluster (python -m lctrain.ray.entrypoint ...)
    lctrain.ray.trainer     the TorchTrainer and the per-worker function (reports metrics and checkpoints to Ray)

Storage: the run directory must be on storage that every node sees (a shared filesystem). It is also Ray Train's
experiment directory (``RunConfig(storage_path=<run_dir>/.., name=<run_dir name>)``), so the checkpoints that lctrain
writes there are Ray-managed checkpoints that need no copying.
"""
