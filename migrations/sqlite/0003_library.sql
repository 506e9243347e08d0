-- Library runs: what the folder walk learnt about each file, so a rerun can skip
-- unchanged files without opening them (path, size and mtime match).
CREATE TABLE library_files (
    path      TEXT PRIMARY KEY NOT NULL,  -- canonical path
    size      INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    hash      TEXT NOT NULL,              -- BLAKE3 of the content; '' when not an image
    is_image  INTEGER NOT NULL,           -- selected by extension or by content
    seen_at   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX library_files_hash ON library_files (hash) WHERE hash <> '';

-- Files that `captiond export` wrote, with the BLAKE3 of what it wrote, so a later
-- export may replace its own text but never text someone else put there.
CREATE TABLE export_files (
    path         TEXT PRIMARY KEY NOT NULL,
    content_hash TEXT NOT NULL,
    written_at   INTEGER NOT NULL
) WITHOUT ROWID;
