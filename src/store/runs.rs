//! The run log: one row per pass of every job (`sync`, `backfill`, `reconcile`, `retry`,
//! `events`), its outcome and summary (redacted), pruned as it ages.

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};

use super::{parse_ts, ts, Result, Store};

/// One row of the run log.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: i64,
    pub job: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub summary: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// A `runs` row read as `id, job, started_at, finished_at, outcome, summary, error`.
pub(crate) fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: r.get(0)?,
        job: r.get(1)?,
        started_at: parse_ts(&r.get::<_, String>(2)?).unwrap_or_default(),
        finished_at: r.get::<_, Option<String>>(3)?.as_deref().and_then(parse_ts),
        outcome: r.get(4)?,
        summary: r
            .get::<_, Option<String>>(5)?
            .and_then(|s| serde_json::from_str(&s).ok()),
        error: r.get(6)?,
    })
}

/// Fact: when Bitrix24 last answered a request (written by a pass).
pub const LAST_CONTACT: &str = "bitrix24.last_contact";

impl Store {
    pub fn begin_run(&self, job: &str, now: DateTime<Utc>) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO runs (job, started_at) VALUES (?1, ?2)",
            params![job, ts(now)],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn finish_run(
        &self,
        id: i64,
        now: DateTime<Utc>,
        outcome: &str,
        summary: Option<&serde_json::Value>,
        error: Option<&str>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE runs SET finished_at = ?2, outcome = ?3, summary = ?4, error = ?5 WHERE id = ?1",
            // The run log is shown by `status`: no secret ever lands in it.
            params![
                id,
                ts(now),
                outcome,
                summary.map(|s| crate::redact::redact(&s.to_string()).into_owned()),
                error.map(|e| crate::redact::redact(e).into_owned())
            ],
        )?;
        Ok(())
    }

    /// The latest run of `job` (any job when `None`).
    pub fn last_run(&self, job: Option<&str>) -> Result<Option<RunRecord>> {
        let sql = "SELECT id, job, started_at, finished_at, outcome, summary, error FROM runs
                   WHERE (?1 IS NULL OR job = ?1) ORDER BY id DESC LIMIT 1";
        Ok(self.conn.query_row(sql, [job], run_from_row).optional()?)
    }
}

impl Store {
    /// When `job` last finished successfully.
    /// Since when sync has been healthy: the earlier of the last successful sync run and the
    /// last answer from Bitrix24 (fact `bitrix24.last_contact`, where recorded). A pass with
    /// nothing to do is no proof that the portal is reachable.
    pub fn last_healthy_sync(&self) -> Result<Option<DateTime<Utc>>> {
        let run = self.last_ok_run("sync")?;
        let contact = self.fact(LAST_CONTACT)?.as_deref().and_then(parse_ts);
        Ok(match (run, contact) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, None) => r,
            (None, Some(_)) => None,
        })
    }

    pub fn last_ok_run(&self, job: &str) -> Result<Option<DateTime<Utc>>> {
        let v: Option<String> = self
            .conn
            .query_row(
                "SELECT MAX(finished_at) FROM runs WHERE job = ?1 AND outcome = 'ok'",
                [job],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        Ok(v.as_deref().and_then(parse_ts))
    }

    /// When the oldest recorded run of `job` started.
    pub fn first_run_at(&self, job: &str) -> Result<Option<DateTime<Utc>>> {
        let v: Option<String> = self
            .conn
            .query_row(
                "SELECT MIN(started_at) FROM runs WHERE job = ?1",
                [job],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        Ok(v.as_deref().and_then(parse_ts))
    }

    /// Deletes the runs of `job` that started before `before` (the frequent `events` runs keep
    /// a shorter history than the rest).
    pub fn prune_runs_of(&self, job: &str, before: DateTime<Utc>) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM runs WHERE job = ?1 AND started_at < ?2",
            params![job, ts(before)],
        )?)
    }

    /// Forgets runs that started before `before` (the log would otherwise grow by a row a minute).
    pub fn prune_runs(&self, before: DateTime<Utc>) -> Result<usize> {
        Ok(self
            .conn
            .execute("DELETE FROM runs WHERE started_at < ?1", [ts(before)])?)
    }
}
