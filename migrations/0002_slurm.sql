-- Slurm backend: the job a run is in (NULL when none is live) and how often it was resubmitted.
ALTER TABLE runs ADD COLUMN slurm_job TEXT;
ALTER TABLE runs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
