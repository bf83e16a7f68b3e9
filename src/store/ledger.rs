//! The pipeline's tables: observed calls, the per-call Bitrix24 ledger, quarantine, operators.
//!
//! Observation follows the conflict rule in ARCHITECTURE.md: a call's stored content is replaced
//! only by an observation fetched later than the stored one. Ledger changes are whole rows written
//! by [`Store::apply`] in one transaction, together with quarantine entries and, optionally, the
//! cursor the recorded work completes.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use rusqlite::{params, OptionalExtension, Row};

use super::{parse_ts, set_cursor, ts, Result, Store};

/// Where a call stands with Bitrix24 (see the `ledger` table in `migrations.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Pending,
    InFlight,
    Registered,
    Finished,
    Done,
    Skipped,
    Quarantined,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::InFlight => "in_flight",
            Stage::Registered => "registered",
            Stage::Finished => "finished",
            Stage::Done => "done",
            Stage::Skipped => "skipped",
            Stage::Quarantined => "quarantined",
        }
    }

    pub fn parse(s: &str) -> Stage {
        match s {
            "in_flight" => Stage::InFlight,
            "registered" => Stage::Registered,
            "finished" => Stage::Finished,
            "done" => Stage::Done,
            "skipped" => Stage::Skipped,
            "quarantined" => Stage::Quarantined,
            _ => Stage::Pending,
        }
    }
}

/// One row of the ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRow {
    pub call_id: String,
    pub stage: Stage,
    pub reason: Option<String>,
    pub b24_call_id: Option<String>,
    pub b24_stat_id: Option<i64>,
    pub b24_activity_id: Option<i64>,
    pub crm_entity_type: Option<String>,
    pub crm_entity_id: Option<i64>,
    pub responsible_id: Option<i64>,
    pub record_url: Option<String>,
    pub task_id: Option<i64>,
    pub task_in_flight_since: Option<DateTime<Utc>>,
    pub lead_id: Option<i64>,
    pub pushed_hash: Option<String>,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub in_flight_since: Option<DateTime<Utc>>,
    /// The client's number (E.164), once the call is in Bitrix24.
    pub client: Option<String>,
    /// The call reached the client (answered, either way).
    pub reached: bool,
    /// `task_id` is another call's task that this missed call commented on (one open task per
    /// client). With `task_id` empty: a comment was refused, so this call gets its own task.
    pub task_comment: bool,
    /// On a task's own call: when the task was completed by a call-back, or when the call
    /// needed no task because the client was reached after it.
    pub task_closed_at: Option<DateTime<Utc>>,
    /// The call that reached the client.
    pub task_closed_by: Option<String>,
    /// `record_url` went in `finish`'s `RECORD_URL` and is unproven: from this time the call
    /// statistics are read for its file (`sync/record_check.rs`).
    pub record_check_at: Option<DateTime<Utc>>,
}

/// How the reason of a call begins whose activity was left out on purpose (activity mode, no
/// CRM entity and no lead) while its missed-call task is still due: the row is `Finished`
/// without any Bitrix24 record of the call.
pub const NO_ACTIVITY: &str = "no activity: ";

impl LedgerRow {
    /// Whether the call's activity was left out on purpose (`NO_ACTIVITY`): Bitrix24 holds no
    /// record of it, only (once made) its task.
    pub fn activity_left_out(&self) -> bool {
        self.b24_activity_id.is_none()
            && self.b24_call_id.is_none()
            && self
                .reason
                .as_deref()
                .is_some_and(|r| r.starts_with(NO_ACTIVITY))
    }

    /// A fresh row for a newly observed call.
    pub fn pending(call_id: &str) -> Self {
        Self {
            call_id: call_id.into(),
            stage: Stage::Pending,
            reason: None,
            b24_call_id: None,
            b24_stat_id: None,
            b24_activity_id: None,
            crm_entity_type: None,
            crm_entity_id: None,
            responsible_id: None,
            record_url: None,
            task_id: None,
            task_in_flight_since: None,
            lead_id: None,
            pushed_hash: None,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            in_flight_since: None,
            client: None,
            reached: false,
            task_comment: false,
            task_closed_at: None,
            task_closed_by: None,
            record_check_at: None,
        }
    }
}

/// A call as fetched, ready to be stored.
#[derive(Debug, Clone)]
pub struct Observation {
    pub call_id: String,
    pub started_at: DateTime<Utc>,
    pub raw: String,
    pub content_hash: String,
}

/// What storing an observation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    New,
    Changed,
    Unchanged,
    /// A later observation is already stored; this one was ignored.
    Stale,
}

/// A call's stored content and ledger row, for the planner.
#[derive(Debug, Clone)]
pub struct WorkItem {
    pub ledger: LedgerRow,
    pub raw: String,
    pub content_hash: String,
    pub started_at: DateTime<Utc>,
}

/// A quarantined record.
#[derive(Debug, Clone, PartialEq)]
pub struct QuarantineEntry {
    pub id: i64,
    pub source: String,
    pub call_id: Option<String>,
    pub raw: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
}

/// Something to quarantine, written with [`Store::apply`].
#[derive(Debug, Clone)]
pub struct NewQuarantine {
    pub source: &'static str,
    pub call_id: Option<String>,
    pub raw: String,
    pub reason: String,
}

pub(super) const LEDGER_COLUMNS: &str = "call_id, stage, reason, b24_call_id, b24_stat_id, b24_activity_id, crm_entity_type,
    crm_entity_id, responsible_id, record_url, task_id, task_in_flight_since, lead_id, pushed_hash, attempts,
    last_error, next_attempt_at, in_flight_since, client, reached, task_comment, task_closed_at, task_closed_by, record_check_at";

/// How many columns [`LEDGER_COLUMNS`] names (extra selected columns follow them).
pub(super) const LEDGER_WIDTH: usize = 24;

pub(super) fn ledger_from(r: &Row<'_>) -> rusqlite::Result<LedgerRow> {
    let t = |i: usize| -> rusqlite::Result<Option<DateTime<Utc>>> {
        Ok(r.get::<_, Option<String>>(i)?.as_deref().and_then(parse_ts))
    };
    Ok(LedgerRow {
        call_id: r.get(0)?,
        stage: Stage::parse(&r.get::<_, String>(1)?),
        reason: r.get(2)?,
        b24_call_id: r.get(3)?,
        b24_stat_id: r.get(4)?,
        b24_activity_id: r.get(5)?,
        crm_entity_type: r.get(6)?,
        crm_entity_id: r.get(7)?,
        responsible_id: r.get(8)?,
        record_url: r.get(9)?,
        task_id: r.get(10)?,
        task_in_flight_since: t(11)?,
        lead_id: r.get(12)?,
        pushed_hash: r.get(13)?,
        attempts: r.get(14)?,
        last_error: r.get(15)?,
        next_attempt_at: t(16)?,
        in_flight_since: t(17)?,
        client: r.get(18)?,
        reached: r.get(19)?,
        task_comment: r.get(20)?,
        task_closed_at: t(21)?,
        task_closed_by: r.get(22)?,
        record_check_at: t(23)?,
    })
}

pub(super) fn save_ledger(
    conn: &rusqlite::Connection,
    l: &LedgerRow,
    now: DateTime<Utc>,
) -> Result<()> {
    conn.execute(
        &format!(
            "INSERT OR REPLACE INTO ledger ({LEDGER_COLUMNS}, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
                     ?19, ?20, ?21, ?22, ?23, ?24, ?25)"
        ),
        params![
            l.call_id,
            l.stage.as_str(),
            l.reason,
            l.b24_call_id,
            l.b24_stat_id,
            l.b24_activity_id,
            l.crm_entity_type,
            l.crm_entity_id,
            l.responsible_id,
            l.record_url,
            l.task_id,
            l.task_in_flight_since.map(ts),
            l.lead_id,
            l.pushed_hash,
            l.attempts,
            l.last_error,
            l.next_attempt_at.map(ts),
            l.in_flight_since.map(ts),
            l.client,
            l.reached,
            l.task_comment,
            l.task_closed_at.map(ts),
            l.task_closed_by,
            l.record_check_at.map(ts),
            ts(now)
        ],
    )?;
    Ok(())
}

impl Store {
    /// Stores observations fetched at `fetched_at` (one transaction). The later fetch wins: a
    /// stored observation newer than `fetched_at` is kept. A changed call that was done goes back
    /// to `finished` (follow-ups may be due); a skipped one to `pending` (to be classified again).
    pub fn observe(
        &mut self,
        obs: &[Observation],
        fetched_at: DateTime<Utc>,
    ) -> Result<Vec<Observed>> {
        let tx = self.conn.transaction()?;
        let mut out = Vec::with_capacity(obs.len());
        for o in obs {
            let stored: Option<(String, String)> = tx
                .query_row(
                    "SELECT content_hash, observed_at FROM calls WHERE call_id = ?1",
                    [&o.call_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let result = match stored {
                None => {
                    tx.execute(
                        "INSERT INTO calls (call_id, started_at, raw, content_hash, observed_at, first_seen_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                        params![o.call_id, ts(o.started_at), o.raw, o.content_hash, ts(fetched_at)],
                    )?;
                    save_ledger(&tx, &LedgerRow::pending(&o.call_id), fetched_at)?;
                    Observed::New
                }
                Some((hash, _)) if hash == o.content_hash => Observed::Unchanged,
                Some((_, observed_at))
                    if parse_ts(&observed_at).is_some_and(|t| t > fetched_at) =>
                {
                    Observed::Stale
                }
                Some(_) => {
                    tx.execute(
                        "UPDATE calls SET started_at = ?2, raw = ?3, content_hash = ?4, observed_at = ?5 WHERE call_id = ?1",
                        params![o.call_id, ts(o.started_at), o.raw, o.content_hash, ts(fetched_at)],
                    )?;
                    tx.execute(
                        "UPDATE ledger SET stage = CASE stage WHEN 'done' THEN 'finished' WHEN 'skipped' THEN 'pending' ELSE stage END,
                                           updated_at = ?2
                         WHERE call_id = ?1",
                        params![o.call_id, ts(fetched_at)],
                    )?;
                    Observed::Changed
                }
            };
            out.push(result);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Calls with work left (pending, in flight, registered, finished) whose retry time has come.
    pub fn work_due(&self, now: DateTime<Utc>) -> Result<Vec<WorkItem>> {
        let cols = LEDGER_COLUMNS
            .split(',')
            .map(|c| format!("l.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut st = self.conn.prepare(&format!(
            "SELECT {cols}, c.raw, c.content_hash, c.started_at FROM ledger l JOIN calls c ON c.call_id = l.call_id
             WHERE l.stage IN ('pending', 'in_flight', 'registered', 'finished')
               AND (l.next_attempt_at IS NULL OR l.next_attempt_at <= ?1)
             ORDER BY c.started_at, l.call_id"
        ))?;
        let rows = st.query_map([ts(now)], |r| {
            Ok(WorkItem {
                ledger: ledger_from(r)?,
                raw: r.get(LEDGER_WIDTH)?,
                content_hash: r.get(LEDGER_WIDTH + 1)?,
                started_at: parse_ts(&r.get::<_, String>(LEDGER_WIDTH + 2)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn ledger_row(&self, call_id: &str) -> Result<Option<LedgerRow>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {LEDGER_COLUMNS} FROM ledger WHERE call_id = ?1"),
                [call_id],
                ledger_from,
            )
            .optional()?)
    }

    /// Every ledger row, oldest call first (for status, reports and tests).
    pub fn ledger_rows(&self) -> Result<Vec<LedgerRow>> {
        let cols = LEDGER_COLUMNS
            .split(',')
            .map(|c| format!("l.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut st = self
            .conn
            .prepare(&format!("SELECT {cols} FROM ledger l JOIN calls c ON c.call_id = l.call_id ORDER BY c.started_at, l.call_id"))?;
        let rows = st.query_map([], ledger_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Ledger rows counted by stage.
    pub fn stage_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut st = self
            .conn
            .prepare("SELECT stage, COUNT(*) FROM ledger GROUP BY stage ORDER BY stage")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Writes ledger rows, quarantine entries and (optionally) a cursor in one transaction.
    /// A quarantine entry identical to an open one is not written twice.
    pub fn apply(
        &mut self,
        rows: &[LedgerRow],
        quarantine: &[NewQuarantine],
        cursor: Option<(&str, DateTime<Utc>)>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        for r in rows {
            save_ledger(&tx, r, now)?;
        }
        for q in quarantine {
            let open: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM quarantine WHERE released_at IS NULL AND source = ?1 AND raw = ?2
                                AND call_id IS ?3)",
                params![q.source, q.raw, q.call_id],
                |r| r.get(0),
            )?;
            if !open {
                tx.execute(
                    "INSERT INTO quarantine (source, call_id, raw, reason, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![q.source, q.call_id, q.raw, q.reason, ts(now)],
                )?;
            }
        }
        if let Some((stream, position)) = cursor {
            set_cursor(&tx, stream, position, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Open (unreleased) quarantine entries, oldest first.
    pub fn quarantined(&self) -> Result<Vec<QuarantineEntry>> {
        let mut st = self.conn.prepare(
            "SELECT id, source, call_id, raw, reason, created_at FROM quarantine WHERE released_at IS NULL ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(QuarantineEntry {
                id: r.get(0)?,
                source: r.get(1)?,
                call_id: r.get(2)?,
                raw: r.get(3)?,
                reason: r.get(4)?,
                created_at: parse_ts(&r.get::<_, String>(5)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Marks a quarantine entry released and, for a call in the ledger, makes it pending again.
    pub fn release(&mut self, entry_id: i64, now: DateTime<Utc>) -> Result<()> {
        let tx = self.conn.transaction()?;
        let call_id: Option<String> = tx
            .query_row(
                "SELECT call_id FROM quarantine WHERE id = ?1",
                [entry_id],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        tx.execute(
            "UPDATE quarantine SET released_at = ?2 WHERE id = ?1",
            params![entry_id, ts(now)],
        )?;
        if let Some(id) = call_id {
            // Back to the stage its Bitrix24 ids prove, so a call already in Bitrix24 is never
            // registered again.
            tx.execute(
                "UPDATE ledger SET stage = CASE
                            WHEN b24_stat_id IS NOT NULL OR b24_activity_id IS NOT NULL THEN 'finished'
                            WHEN b24_call_id IS NOT NULL THEN 'registered'
                            ELSE 'pending' END,
                        reason = NULL, attempts = 0, last_error = NULL, next_attempt_at = NULL, updated_at = ?2
                 WHERE call_id = ?1 AND stage = 'quarantined'",
                params![id, ts(now)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The whole database copied into memory (for dry runs: they plan as a pass would, and
    /// nothing they do reaches the file or leaves a scratch file behind).
    pub fn in_memory_copy(&self) -> Result<Store> {
        let mut mem = rusqlite::Connection::open_in_memory()?;
        {
            let backup = rusqlite::backup::Backup::new(&self.conn, &mut mem)?;
            backup.run_to_completion(1024, std::time::Duration::ZERO, None)?;
        }
        mem.execute_batch("PRAGMA foreign_keys = ON;")?;
        Ok(Store::from_connection(mem, self.path.clone()))
    }

    // ---- operators -------------------------------------------------------------------------

    /// Records the operators Unitalk lists (names only; the Bitrix24 mapping is kept).
    pub fn upsert_operators(
        &mut self,
        ops: &[(String, Option<String>, Option<String>)],
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        for (line, first, last) in ops {
            tx.execute(
                "INSERT INTO operators (line, first_name, last_name) VALUES (?1, ?2, ?3)
                 ON CONFLICT(line) DO UPDATE SET first_name = excluded.first_name, last_name = excluded.last_name",
                params![line, first, last],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every known inner line, with its Bitrix24 user when a lookup younger than `max_age` found one.
    /// `None` as the outer value means "look it up".
    pub fn operator_map(
        &self,
        now: DateTime<Utc>,
        max_age: Duration,
    ) -> Result<HashMap<String, Option<Option<i64>>>> {
        let mut st = self
            .conn
            .prepare("SELECT line, b24_user_id, resolved_at FROM operators")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let (line, user, resolved) = row?;
            let fresh = resolved
                .as_deref()
                .and_then(parse_ts)
                .is_some_and(|t| now - t < max_age);
            out.insert(line, fresh.then_some(user));
        }
        Ok(out)
    }

    /// Forgets every lookup that found no Bitrix24 user, so the next pass asks again.
    pub fn forget_unmatched_operators(&self) -> Result<()> {
        self.conn.execute(
            "UPDATE operators SET resolved_at = NULL WHERE b24_user_id IS NULL",
            [],
        )?;
        Ok(())
    }

    /// Caches the Bitrix24 user of an inner line (`None`: no active user has it).
    pub fn set_operator_user(
        &self,
        line: &str,
        user: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO operators (line, b24_user_id, resolved_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(line) DO UPDATE SET b24_user_id = excluded.b24_user_id, resolved_at = excluded.resolved_at",
            params![line, user, ts(now)],
        )?;
        Ok(())
    }
}
