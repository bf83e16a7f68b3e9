//! Events in: the inbox every accepted Unitalk webhook and Bitrix24 event is persisted to
//! before it is answered, and `seen_by`, which path saw a call first.

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::{parse_ts, ts, Result, Store};

/// An inbound event waiting to be processed.
#[derive(Debug, Clone)]
pub struct InboxItem {
    pub id: i64,
    pub body: String,
    pub content_type: Option<String>,
    pub received_at: DateTime<Utc>,
}

impl Store {
    /// Persists an accepted event; returns its id.
    pub fn inbox_add(
        &self,
        source: &str,
        body: &str,
        content_type: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO inbox (source, body, content_type, received_at) VALUES (?1, ?2, ?3, ?4)",
            params![source, body, content_type, ts(now)],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Unprocessed events of `source`, oldest first.
    pub fn inbox_pending(&self, source: &str, limit: usize) -> Result<Vec<InboxItem>> {
        let mut st = self.conn.prepare(
            "SELECT id, body, content_type, received_at FROM inbox
             WHERE processed_at IS NULL AND source = ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = st.query_map(params![source, limit as i64], |r| {
            Ok(InboxItem {
                id: r.get(0)?,
                body: r.get(1)?,
                content_type: r.get(2)?,
                received_at: parse_ts(&r.get::<_, String>(3)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many events wait, all sources.
    pub fn inbox_waiting(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM inbox WHERE processed_at IS NULL",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Marks every waiting event of `source` processed with `outcome` (its route was turned off).
    pub fn inbox_drop(&self, source: &str, outcome: &str, now: DateTime<Utc>) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE inbox SET processed_at = ?2, outcome = ?3 WHERE processed_at IS NULL AND source = ?1",
            params![source, ts(now), outcome],
        )?)
    }

    /// Marks an event processed with what became of it.
    pub fn inbox_done(&self, id: i64, outcome: &str, now: DateTime<Utc>) -> Result<()> {
        self.conn.execute(
            "UPDATE inbox SET processed_at = ?2, outcome = ?3 WHERE id = ?1",
            params![id, ts(now), outcome],
        )?;
        Ok(())
    }

    /// Records the path that saw `call_id` first (a later sighting changes nothing).
    pub fn seen_by_add(
        &self,
        call_id: &str,
        path: &str,
        fingerprint: &str,
        started_at: DateTime<Utc>,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO seen_by (call_id, path, fingerprint, started_at) VALUES (?1, ?2, ?3, ?4)",
            params![call_id, path, fingerprint, ts(started_at)],
        )?;
        Ok(())
    }

    /// A call the other path saw with the same fingerprint, starting within `slack_secs`, under
    /// another id.
    pub fn twin(
        &self,
        call_id: &str,
        fingerprint: &str,
        started_at: DateTime<Utc>,
        slack_secs: i64,
    ) -> Result<Option<String>> {
        let lo = ts(started_at - chrono::Duration::seconds(slack_secs));
        let hi = ts(started_at + chrono::Duration::seconds(slack_secs));
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .query_row(
                "SELECT call_id FROM seen_by WHERE fingerprint = ?1 AND call_id != ?2
                   AND started_at >= ?3 AND started_at <= ?4 LIMIT 1",
                params![fingerprint, call_id, lo, hi],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Whether `call_id` was seen by any path.
    pub fn seen(&self, call_id: &str) -> Result<bool> {
        Ok(self.conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM seen_by WHERE call_id = ?1)",
            [call_id],
            |r| r.get(0),
        )?)
    }

    /// Calls by the path that saw them first.
    pub fn seen_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut st = self
            .conn
            .prepare("SELECT path, COUNT(*) FROM seen_by GROUP BY path ORDER BY path")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
