//! The schema, as an append-only list of migrations keyed on `PRAGMA user_version`.
//!
//! Never edit or reorder a migration that has shipped: append a new one. Each runs in its own
//! transaction together with the `user_version` bump, so a crash leaves the file at a whole version.
//! All instants are stored as RFC 3339 UTC text (`2026-11-22T08:15:00Z`), which sorts correctly.

/// Migration 1: the pipeline's tables.
const V1: &str = r#"
-- Per-stream progress. `position` is an instant: every call that started before it has been
-- handled (pushed, skipped or quarantined). Advanced only in the transaction that records what
-- Bitrix24 acknowledged for the window it closes.
CREATE TABLE cursors (
    stream      TEXT PRIMARY KEY,          -- 'history' (regular passes), 'backfill:<from>..<to>', ...
    position    TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

-- The latest observation of each Unitalk call. When the same call is fetched twice with different
-- content, the later fetch wins (`observed_at`), whichever pass made it.
CREATE TABLE calls (
    call_id       TEXT PRIMARY KEY,        -- Unitalk `id`, as text
    started_at    TEXT NOT NULL,           -- call start as an instant (Unitalk `date` read in its zone)
    raw           TEXT NOT NULL,           -- the record exactly as Unitalk sent it (JSON)
    content_hash  TEXT NOT NULL,           -- hash of the fields that matter to Bitrix24
    observed_at   TEXT NOT NULL,           -- when this version was fetched
    first_seen_at TEXT NOT NULL
);
CREATE INDEX calls_by_start ON calls(started_at);

-- What Bitrix24 has acknowledged for each call: the source of truth for "already pushed".
CREATE TABLE ledger (
    call_id          TEXT PRIMARY KEY REFERENCES calls(call_id),
    -- pending: nothing acknowledged. in_flight: its main chain was sent, outcome not recorded
    -- (the next pass probes Bitrix24 before anything else). registered: register acknowledged,
    -- finish not. finished: the call is in Bitrix24; a recording or task may still be due.
    -- done: nothing left. skipped: deliberately not pushed (internal call, ...). quarantined.
    stage            TEXT NOT NULL CHECK (stage IN
                       ('pending', 'in_flight', 'registered', 'finished', 'done', 'skipped', 'quarantined')),
    reason           TEXT,                 -- why skipped or quarantined
    b24_call_id      TEXT,                 -- telephony CALL_ID from register
    b24_stat_id      INTEGER,              -- statistics row id from finish
    b24_activity_id  INTEGER,              -- CRM call activity (finish or crm.activity.add)
    crm_entity_type  TEXT,                 -- CONTACT | LEAD | COMPANY
    crm_entity_id    INTEGER,
    responsible_id   INTEGER,              -- Bitrix24 user the call and its task belong to
    record_url       TEXT,                 -- recording link Bitrix24 acknowledged
    task_id          INTEGER,              -- missed-call task, once created
    task_in_flight_since TEXT,             -- set before tasks.task.add is sent; cleared when recorded
    lead_id          INTEGER,              -- lead ubsync created for this call (activity mode)
    pushed_hash      TEXT,                 -- content hash as of the last full acknowledgement
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    next_attempt_at  TEXT,                 -- retryable failures wait until then
    in_flight_since  TEXT,                 -- set before a batch is sent; cleared when it is recorded
    updated_at       TEXT NOT NULL
);
CREATE INDEX ledger_by_stage ON ledger(stage);

-- What could not be processed, with why. Never blocks the cursor or other calls; `ubsync retry`
-- releases entries.
CREATE TABLE quarantine (
    id           INTEGER PRIMARY KEY,
    source       TEXT NOT NULL CHECK (source IN ('unitalk', 'bitrix24')),
    call_id      TEXT,                     -- when the record had a readable id
    raw          TEXT NOT NULL,
    reason       TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    released_at  TEXT                      -- set by `ubsync retry`
);
CREATE INDEX quarantine_open ON quarantine(released_at, call_id);

-- Latest known status of each Unitalk inner line. An observation replaces the stored one only if
-- it is newer (timestamp wins; late or out-of-order observations are ignored).
CREATE TABLE line_status (
    line         TEXT PRIMARY KEY,
    status       TEXT NOT NULL,
    observed_at  TEXT NOT NULL,
    raw          TEXT
);

-- Unitalk operators (by inner line) and the Bitrix24 user each maps to via user.get UF_PHONE_INNER.
CREATE TABLE operators (
    line         TEXT PRIMARY KEY,
    first_name   TEXT,
    last_name    TEXT,
    b24_user_id  INTEGER,                  -- NULL: looked up, no active user has this extension
    resolved_at  TEXT                      -- NULL: not looked up yet
);

-- The OAuth pair of the local application, per portal. Replaced in one statement on every
-- refresh, so a crash leaves either the old or the new pair, never neither.
CREATE TABLE oauth_tokens (
    portal             TEXT PRIMARY KEY,   -- portal host
    access_token       TEXT NOT NULL,
    refresh_token      TEXT NOT NULL,
    expires_at         TEXT,
    client_endpoint    TEXT,
    server_endpoint    TEXT,
    member_id          TEXT,
    application_token  TEXT,
    scope              TEXT,
    updated_at         TEXT NOT NULL
);

-- One row per pass or command run, for `status`, health and metrics.
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY,
    job          TEXT NOT NULL,            -- sync | lines | reconcile | backfill | demo
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    outcome      TEXT,                     -- ok | failed | interrupted
    summary      TEXT,                     -- JSON counters
    error        TEXT
);
CREATE INDEX runs_by_job ON runs(job, id);
"#;

/// Migration 2: facts learned about the portal at run time.
const V2: &str = r#"
-- What ubsync has learned about this portal's behaviour, e.g. that it refuses attachRecord inside
-- a batch, or that it moved to a new address (302). Keyed by fact name.
CREATE TABLE portal_facts (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
"#;

/// Migration 3: no secret outside `oauth_tokens`, no endpoint taken from upstream.
const V3: &str = r#"
-- v1 remembered a moved webhook's full URL (its code included) as a fact; moves are now
-- remembered as origins only (`bitrix24.moved:<configured origin>`), keyed by the configured
-- address so an edited config always wins.
DELETE FROM portal_facts WHERE key = 'bitrix24.moved_webhook_url';
-- Requests go only to the configured portal: endpoints from callbacks are no longer stored.
UPDATE oauth_tokens SET client_endpoint = NULL, server_endpoint = NULL;
"#;

/// Migration 4: follow-ups that do not depend on the pull window.
const V4: &str = r#"
-- Answered calls finished in Bitrix24 without a recording link: Unitalk publishes links minutes
-- (on backfills, hours) after the call. Each pass re-pulls the narrow time ranges of the rows
-- `awaiting` whose `next_check_at` has come, until `until`; then the row is `given_up`. Calls
-- that need no recording are recorded as `not_expected` so they are judged once.
CREATE TABLE recording_watch (
    call_id        TEXT PRIMARY KEY REFERENCES calls(call_id),
    started_at     TEXT NOT NULL,            -- the call's start, to re-pull its range
    state          TEXT NOT NULL,            -- awaiting | attached | given_up | not_expected
    until          TEXT NOT NULL,            -- give up after this instant
    next_check_at  TEXT NOT NULL,
    checks         INTEGER NOT NULL DEFAULT 0,
    updated_at     TEXT NOT NULL
);
CREATE INDEX recording_watch_due ON recording_watch(state, next_check_at);
"#;

/// Migration 5: verify-first after a lost state file.
const V5: &str = r#"
-- Calls already looked up in Bitrix24 before their first registration. A state file that starts
-- empty (a new install, or a deleted or replaced file) cannot know what an earlier one pushed:
-- every call that started before the fact `ledger.verify_before` is looked up first (statistics
-- by EXTERNAL_CALL_ID, activities by ORIGIN_ID, tasks), once; its id is then recorded here.
CREATE TABLE verified (
    call_id      TEXT PRIMARY KEY,
    verified_at  TEXT NOT NULL
);
"#;

/// Migration 6: CRM lookups remembered across passes.
const V6: &str = r#"
-- What Bitrix24 answered when a client number was looked up (crm.duplicate.findbycomm or
-- telephony.externalCall.searchCrmEntities): only entities found, never "nobody" (a number
-- without an entity may have one a minute later: a lead created by register or by ubsync).
-- Used for `sync.crm_cache` after `looked_up_at`, then asked again.
CREATE TABLE crm_lookup (
    number          TEXT PRIMARY KEY,        -- E.164
    entity_type     TEXT NOT NULL,           -- CONTACT | COMPANY | LEAD
    entity_id       INTEGER NOT NULL,
    responsible_id  INTEGER,                 -- ASSIGNED_BY_ID when the answer carried it
    looked_up_at    TEXT NOT NULL
);
"#;

/// Migration 7: one open missed-call task per client, completed by the call-back.
const V7: &str = r#"
-- The client of a pushed call and whether it reached them: a missed call whose client has an
-- open task comments on it; an answered call with that client completes it.
ALTER TABLE ledger ADD COLUMN client TEXT;
ALTER TABLE ledger ADD COLUMN reached INTEGER NOT NULL DEFAULT 0;
-- task_id names another call's task this call commented on.
ALTER TABLE ledger ADD COLUMN task_comment INTEGER NOT NULL DEFAULT 0;
-- On a task's own call: completed by a call-back (or no task was needed), and by which call.
ALTER TABLE ledger ADD COLUMN task_closed_at TEXT;
ALTER TABLE ledger ADD COLUMN task_closed_by TEXT;
CREATE INDEX ledger_client ON ledger (client);
"#;

/// Migration 8: missed-call notifications (`rules.notify`).
const V8: &str = r#"
-- Missed calls whose notification was decided: sent (1) or held back by the per-client limit (0).
-- Written before the notification is sent: a lost answer never notifies twice.
CREATE TABLE notified (
    call_id      TEXT PRIMARY KEY,
    sent         INTEGER NOT NULL,
    notified_at  TEXT NOT NULL
);
-- When each client last caused a notification (the per-client limit).
CREATE TABLE notify_client (
    client   TEXT PRIMARY KEY,
    last_at  TEXT NOT NULL
);
"#;

/// Migration 9: how long a line has had its status, and whether supervisors were told.
const V9: &str = r#"
-- status_since: the observation time of the first observation with the current status (a line
-- offline for N minutes is alerted on); alerted: 1 once supervisors were told it is offline
-- (cleared, with a "back" notice, when it is seen online again).
ALTER TABLE line_status ADD COLUMN status_since TEXT;
ALTER TABLE line_status ADD COLUMN alerted INTEGER NOT NULL DEFAULT 0;
UPDATE line_status SET status_since = observed_at;
"#;

/// Migration 10: events in (Unitalk webhooks, Bitrix24 events) and which path saw a call first.
const V10: &str = r#"
-- Every accepted inbound event, persisted before it is answered and processed from here
-- (Bitrix24 never re-delivers; Unitalk's retries are unknown). processed_at: NULL until done.
CREATE TABLE inbox (
    id            INTEGER PRIMARY KEY,
    source        TEXT NOT NULL CHECK (source IN ('unitalk', 'bitrix24')),
    body          TEXT NOT NULL,
    content_type  TEXT,
    received_at   TEXT NOT NULL,
    processed_at  TEXT,
    outcome       TEXT
);
CREATE INDEX inbox_pending ON inbox (processed_at, id);
-- With webhooks on: the path that saw a call first (webhook or poll) and its fingerprint
-- (direction, client digits), to catch one call seen by both paths under different ids.
CREATE TABLE seen_by (
    call_id      TEXT PRIMARY KEY,
    path         TEXT NOT NULL CHECK (path IN ('webhook', 'poll')),
    fingerprint  TEXT NOT NULL,
    started_at   TEXT NOT NULL
);
CREATE INDEX seen_by_fingerprint ON seen_by (fingerprint, started_at);
"#;

/// Migration 11: click-to-call and CRM callback requests.
const V11: &str = r#"
-- A click on a number in a CRM card (kind 'click': Bitrix24 registered the call, key = its
-- CALL_ID) or a callback form (kind 'callback': key = the EXTERNAL_CALL_ID ubsync registers,
-- b24_call_id once registered). state: new → dialing (Unitalk asked to ring; set before asking,
-- so a crash never rings twice) → claimed (the Unitalk call that came of it is the ledger's
-- call for this CALL_ID) | cancelled (no line, Unitalk refused, or no call within the TTL:
-- finished as 603-S) | ignored (a repeat).
CREATE TABLE clicks (
    key              TEXT PRIMARY KEY,
    kind             TEXT NOT NULL CHECK (kind IN ('click', 'callback')),
    b24_call_id      TEXT,
    user_id          INTEGER,
    inner_line       TEXT,
    number           TEXT NOT NULL,
    line_number      TEXT,
    crm_entity_type  TEXT,
    crm_entity_id    INTEGER,
    requested_at     TEXT NOT NULL,
    state            TEXT NOT NULL,
    unitalk_call_id  TEXT,
    reason           TEXT,
    updated_at       TEXT NOT NULL
);
CREATE INDEX clicks_state ON clicks (state);
"#;

/// Migration 12: a recording sent in `finish`'s `RECORD_URL` is unproven (Bitrix24 reports no
/// error when its download fails) until the statistics show its file.
const V12: &str = r#"
-- When set: finish carried the recording link, and from this time the call statistics are
-- read to prove the file is there (RECORD_FILE_ID); unproven, the link is sent again with
-- attachRecord.
ALTER TABLE ledger ADD COLUMN record_check_at TEXT;
CREATE INDEX ledger_record_check ON ledger (record_check_at) WHERE record_check_at IS NOT NULL;
"#;

/// Every migration, in order. Index `i` brings the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12];
