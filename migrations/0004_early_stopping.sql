-- Early stopping (ASHA / median): runs can be `paused` at a rung and, when the search ends without
-- promoting them, `pruned`; `rung` is the highest rung whose result a run recorded; `rungs` holds every
-- rung result. SQLite cannot change a CHECK constraint in place: the runs table is rebuilt (the documented
-- procedure; the runner applies migrations on a connection with foreign keys off, in one transaction).
CREATE TABLE runs_new (
    id             INTEGER PRIMARY KEY,
    sweep_id       INTEGER NOT NULL REFERENCES sweeps(id),
    idx            INTEGER NOT NULL,
    status         TEXT    NOT NULL CHECK (status IN
                   ('queued', 'running', 'completed', 'failed', 'interrupted', 'skipped_oom', 'paused', 'pruned')),
    params         TEXT    NOT NULL,
    config         TEXT    NOT NULL,
    run_dir        TEXT    NOT NULL,
    device         TEXT,
    pid            INTEGER,
    runner_pid     INTEGER,
    step           INTEGER NOT NULL DEFAULT 0,
    total_steps    INTEGER,
    tokens         INTEGER NOT NULL DEFAULT 0,
    loss           REAL,
    val_loss       REAL,
    best_val_loss  REAL,
    val_bpb        REAL,
    tokens_per_s   REAL,
    wall_s         REAL    NOT NULL DEFAULT 0,
    checkpoint     TEXT,
    param_count    INTEGER,
    mem_estimate   INTEGER,
    error          TEXT,
    created_at     TEXT    NOT NULL,
    started_at     TEXT,
    finished_at    TEXT,
    slurm_job      TEXT,
    restarts       INTEGER NOT NULL DEFAULT 0,
    runner_host    TEXT,
    runner_started INTEGER,
    rung           INTEGER
);
INSERT INTO runs_new (id, sweep_id, idx, status, params, config, run_dir, device, pid, runner_pid, step,
    total_steps, tokens, loss, val_loss, best_val_loss, val_bpb, tokens_per_s, wall_s, checkpoint, param_count,
    mem_estimate, error, created_at, started_at, finished_at, slurm_job, restarts, runner_host, runner_started)
SELECT id, sweep_id, idx, status, params, config, run_dir, device, pid, runner_pid, step,
    total_steps, tokens, loss, val_loss, best_val_loss, val_bpb, tokens_per_s, wall_s, checkpoint, param_count,
    mem_estimate, error, created_at, started_at, finished_at, slurm_job, restarts, runner_host, runner_started
FROM runs;
DROP TABLE runs;
ALTER TABLE runs_new RENAME TO runs;
CREATE INDEX runs_sweep ON runs(sweep_id);
CREATE INDEX runs_status ON runs(status);

-- One row per rung a run reached: the budget it had used there (in the sweep's unit) and the metric.
-- Rows are kept in arrival order (`seq`), which is what asynchronous successive halving decides on.
CREATE TABLE rungs (
    seq      INTEGER PRIMARY KEY,
    run_id   INTEGER NOT NULL REFERENCES runs(id),
    sweep_id INTEGER NOT NULL,
    rung     INTEGER NOT NULL,
    budget   REAL    NOT NULL,
    value    REAL    NOT NULL,
    time     TEXT    NOT NULL,
    UNIQUE (run_id, rung)
);
CREATE INDEX rungs_sweep ON rungs(sweep_id, rung);
