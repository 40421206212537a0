-- The host of the runner that claimed a run: orphan recovery judges only runs claimed on its own host
-- (a home shared between machines must not have one machine mark another's live runs interrupted).
ALTER TABLE runs ADD COLUMN runner_host TEXT;
