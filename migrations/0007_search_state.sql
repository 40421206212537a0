-- What the search needs to hold across runners and kills, kept where every runner reads it.
-- Trial numbers (runs.idx) are allocated from a per-sweep counter and never reused: removing a trial does not
-- hand its number (and so its random stream) to the next one.
ALTER TABLE sweeps ADD COLUMN next_trial INTEGER NOT NULL DEFAULT 0;
UPDATE sweeps SET next_trial = COALESCE((SELECT MAX(idx) + 1 FROM runs WHERE runs.sweep_id = sweeps.id), 0);
-- The early-stopping rung a launched engine was sent to pause at (NULL: its end), written with its claim: a
-- `paused` event is the result at this rung, whoever reads it (a resumed runner, another runner).
ALTER TABLE runs ADD COLUMN pause_rung INTEGER;
-- The runners following a sweep right now (process id, host, start time in clock ticks): queued runs of a
-- sweep with a live runner are that runner's, and the last runner to leave a search ends it.
CREATE TABLE sweep_runners (
    sweep_id INTEGER NOT NULL REFERENCES sweeps(id),
    pid      INTEGER NOT NULL,
    host     TEXT    NOT NULL,
    started  INTEGER,
    PRIMARY KEY (sweep_id, pid, host)
);
-- Compute accounting: a run's training FLOPs per token (forward + backward, the engine's formula) and its
-- parameters outside the token embedding, recorded when the run is planned. FLOPs spent = tokens × this.
ALTER TABLE runs ADD COLUMN flops_per_token REAL;
ALTER TABLE runs ADD COLUMN params_non_embedding INTEGER;
-- The compute budget (training FLOPs) of a run of an IsoFLOP study; NULL for other runs.
ALTER TABLE runs ADD COLUMN budget REAL;
-- A run that starts from another run's checkpoint (an IsoFLOP cell reusing a longer run's stable phase):
-- the run it forks from and the step it forks at; NULL for runs trained from scratch.
ALTER TABLE runs ADD COLUMN parent_id INTEGER;
ALTER TABLE runs ADD COLUMN fork_step INTEGER;
