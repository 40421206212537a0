-- Which sampler chose a run's values (`grid`, `random`, or for TPE sweeps `random` start-up trials and
-- `tpe` ones); NULL for runs made before it was recorded.
ALTER TABLE runs ADD COLUMN sampler TEXT;
