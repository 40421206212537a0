-- Who claimed a run, precisely: the runner's host (orphan recovery judges only runs claimed on its own host,
-- so a home shared between machines never has one machine mark another's live runs interrupted) and its
-- process start time (clock ticks after boot), so a reused pid is not taken for the runner.
ALTER TABLE runs ADD COLUMN runner_host TEXT;
ALTER TABLE runs ADD COLUMN runner_started INTEGER;
