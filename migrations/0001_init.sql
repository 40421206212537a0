-- Bit-Llama Lab run tracking. The runner is the only writer.

CREATE TABLE sweeps (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    file        TEXT    NOT NULL,            -- the sweep TOML it came from
    spec        TEXT    NOT NULL,            -- the resolved sweep spec (JSON)
    created_at  TEXT    NOT NULL
);

CREATE TABLE runs (
    id             INTEGER PRIMARY KEY,
    sweep_id       INTEGER NOT NULL REFERENCES sweeps(id),
    idx            INTEGER NOT NULL,         -- position in the sweep's expansion
    status         TEXT    NOT NULL CHECK (status IN
                   ('queued', 'running', 'completed', 'failed', 'interrupted', 'skipped_oom')),
    params         TEXT    NOT NULL,         -- swept values (JSON object)
    config         TEXT    NOT NULL,         -- the full engine config (TOML)
    run_dir        TEXT    NOT NULL,
    device         TEXT,
    pid            INTEGER,                  -- engine process while running
    runner_pid     INTEGER,                  -- runner that launched it
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
    finished_at    TEXT
);
CREATE INDEX runs_sweep ON runs(sweep_id);
CREATE INDEX runs_status ON runs(status);

-- One row per swept key of a run, so runs can be filtered by value in SQL.
CREATE TABLE run_params (
    run_id  INTEGER NOT NULL REFERENCES runs(id),
    key     TEXT    NOT NULL,
    value   TEXT    NOT NULL,
    num     REAL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;

CREATE TABLE metrics (
    run_id  INTEGER NOT NULL,
    name    TEXT    NOT NULL,
    step    INTEGER NOT NULL,
    value   REAL    NOT NULL,
    time    REAL    NOT NULL,                -- unix seconds when the point was ingested
    PRIMARY KEY (run_id, name, step)
) WITHOUT ROWID;

CREATE TABLE checkpoints (
    run_id  INTEGER NOT NULL,
    step    INTEGER NOT NULL,
    path    TEXT    NOT NULL,
    bytes   INTEGER NOT NULL,
    sha256  TEXT,
    time    TEXT    NOT NULL,
    PRIMARY KEY (run_id, step)
) WITHOUT ROWID;

-- Status changes and notable happenings, with time and reason.
CREATE TABLE events (
    id      INTEGER PRIMARY KEY,
    run_id  INTEGER NOT NULL,
    time    TEXT    NOT NULL,
    kind    TEXT    NOT NULL,
    status  TEXT,
    reason  TEXT
);
CREATE INDEX events_run ON events(run_id);
