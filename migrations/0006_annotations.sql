-- Run management (`runner tag`, `runner note`, `runner rm`): tags (any number per run) and one free-text
-- note per run, shown by `ls`, `show`, `report` and the dashboard.
CREATE TABLE run_tags (
    run_id  INTEGER NOT NULL REFERENCES runs(id),
    tag     TEXT    NOT NULL,
    PRIMARY KEY (run_id, tag)
) WITHOUT ROWID;
CREATE INDEX run_tags_tag ON run_tags(tag);

CREATE TABLE run_notes (
    run_id  INTEGER PRIMARY KEY REFERENCES runs(id),
    note    TEXT    NOT NULL,
    time    TEXT    NOT NULL
);
