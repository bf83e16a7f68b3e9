//! The follow-ups that do not depend on the pull window: the recording watch (answered calls
//! finished without a link, re-checked until Unitalk publishes one or the wait runs out) and
//! the checks of recordings sent in `finish` (proven from the call statistics).

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::{parse_ts, ts, Result, Store};

/// What the watch decided for a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Answered without a link: re-check its time range until `until`.
    Awaiting,
    /// Nothing to wait for (missed, or no talk time).
    NotExpected,
}

/// A recording sent in `finish` whose check is due.
pub struct RecordCheck {
    pub call_id: String,
    pub started_at: DateTime<Utc>,
    pub due_since: DateTime<Utc>,
}

/// A call the watch has not judged yet.
pub struct Candidate {
    pub call_id: String,
    pub raw: String,
    pub started_at: DateTime<Utc>,
}

impl Store {
    /// Finished calls without a recording that the watch has not judged yet, first seen at or
    /// after `since`.
    pub fn recording_candidates(&self, since: DateTime<Utc>) -> Result<Vec<Candidate>> {
        let mut st = self.conn.prepare(
            "SELECT l.call_id, c.raw, c.started_at FROM ledger l
               JOIN calls c ON c.call_id = l.call_id
               LEFT JOIN recording_watch w ON w.call_id = l.call_id
             WHERE w.call_id IS NULL AND l.stage = 'done' AND l.record_url IS NULL
               AND c.first_seen_at >= ?1",
        )?;
        let rows = st.query_map([ts(since)], |r| {
            Ok(Candidate {
                call_id: r.get(0)?,
                raw: r.get(1)?,
                started_at: parse_ts(&r.get::<_, String>(2)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records the watch's judgement of calls: `(call_id, started_at, watch, until)`.
    pub fn watch_recordings(
        &mut self,
        rows: &[(String, DateTime<Utc>, Watch, DateTime<Utc>)],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        for (id, started, watch, until) in rows {
            let state = match watch {
                Watch::Awaiting => "awaiting",
                Watch::NotExpected => "not_expected",
            };
            tx.execute(
                "INSERT OR IGNORE INTO recording_watch
                   (call_id, started_at, state, until, next_check_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![id, ts(*started), state, ts(*until), ts(now)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Settles the watch: rows whose recording is now in Bitrix24 become `attached`, rows past
    /// their wait `given_up`. Returns the ids given up now.
    pub fn settle_recording_watch(&mut self, now: DateTime<Utc>) -> Result<Vec<String>> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE recording_watch SET state = 'attached', updated_at = ?1
             WHERE state = 'awaiting'
               AND call_id IN (SELECT call_id FROM ledger WHERE record_url IS NOT NULL)",
            [ts(now)],
        )?;
        let given_up: Vec<String> = {
            let mut st = tx.prepare(
                "SELECT call_id FROM recording_watch WHERE state = 'awaiting' AND until < ?1",
            )?;
            let rows = st.query_map([ts(now)], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        tx.execute(
            "UPDATE recording_watch SET state = 'given_up', updated_at = ?1
             WHERE state = 'awaiting' AND until < ?1",
            [ts(now)],
        )?;
        tx.commit()?;
        Ok(given_up)
    }

    /// The awaited calls whose re-check is due, oldest first: id, start, checks so far.
    pub fn recordings_due(&self, now: DateTime<Utc>) -> Result<Vec<(String, DateTime<Utc>, u32)>> {
        let mut st = self.conn.prepare(
            "SELECT call_id, started_at, checks FROM recording_watch
             WHERE state = 'awaiting' AND next_check_at <= ?1 ORDER BY started_at",
        )?;
        let rows = st.query_map([ts(now)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                parse_ts(&r.get::<_, String>(1)?).unwrap_or_default(),
                r.get::<_, u32>(2)?,
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Notes that calls were re-checked: `(id, when the next check comes)`.
    pub fn recordings_checked(
        &mut self,
        checked: &[(String, DateTime<Utc>)],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        for (id, next) in checked {
            tx.execute(
                "UPDATE recording_watch SET checks = checks + 1, next_check_at = ?2, updated_at = ?3
                 WHERE call_id = ?1",
                params![id, ts(*next), ts(now)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Calls whose recording went in `finish` and whose check is due, oldest first, at most
    /// 20,000 per pass.
    pub fn record_checks_due(&self, now: DateTime<Utc>) -> Result<Vec<RecordCheck>> {
        let mut st = self.conn.prepare(
            "SELECT l.call_id, c.started_at, l.record_check_at FROM ledger l
               JOIN calls c ON c.call_id = l.call_id
             WHERE l.record_check_at IS NOT NULL AND l.record_check_at <= ?1
             ORDER BY c.started_at LIMIT 20000",
        )?;
        let rows = st.query_map([ts(now)], |r| {
            Ok(RecordCheck {
                call_id: r.get(0)?,
                started_at: parse_ts(&r.get::<_, String>(1)?).unwrap_or_default(),
                due_since: parse_ts(&r.get::<_, String>(2)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Settles recording checks: `proven` ones are done with; `unproven` ones lose their
    /// recording (so the push sends it again with attachRecord) and go back to `finished`.
    pub fn settle_record_checks(
        &mut self,
        proven: &[String],
        unproven: &[String],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        for id in proven {
            tx.execute(
                "UPDATE ledger SET record_check_at = NULL, updated_at = ?2 WHERE call_id = ?1",
                params![id, ts(now)],
            )?;
        }
        for id in unproven {
            tx.execute(
                "UPDATE ledger SET record_check_at = NULL, record_url = NULL,
                        stage = CASE stage WHEN 'done' THEN 'finished' ELSE stage END,
                        updated_at = ?2
                 WHERE call_id = ?1",
                params![id, ts(now)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// How many recordings sent in `finish` are still unproven (for `status`).
    pub fn record_checks_pending(&self) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM ledger WHERE record_check_at IS NOT NULL",
            [],
            |r| r.get(0),
        )?)
    }

    /// Rows of the watch by state (for `status`).
    pub fn recording_watch_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut st = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM recording_watch GROUP BY state ORDER BY state")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Verify-first: pending calls that started before `before`, were never sent and never
    /// looked up, are marked in flight (the call and its task) so the probe looks them up in
    /// Bitrix24 before anything is registered. Returns how many were marked.
    pub fn mark_unverified(&self, before: DateTime<Utc>, now: DateTime<Utc>) -> Result<usize> {
        Ok(self.conn.execute(
            "UPDATE ledger SET stage = 'in_flight', in_flight_since = ?2,
                    task_in_flight_since = (SELECT started_at FROM calls c WHERE c.call_id = ledger.call_id),
                    updated_at = ?2
             WHERE stage = 'pending' AND attempts = 0 AND in_flight_since IS NULL
               AND b24_call_id IS NULL AND b24_activity_id IS NULL AND task_id IS NULL
               AND call_id NOT IN (SELECT call_id FROM verified)
               AND call_id IN (SELECT call_id FROM calls WHERE started_at < ?1)",
            params![ts(before), ts(now)],
        )?)
    }

    /// The calls `mark_unverified` would mark: (id, start), oldest first.
    pub fn unverified(&self, before: DateTime<Utc>) -> Result<Vec<(String, DateTime<Utc>)>> {
        let mut st = self.conn.prepare(
            "SELECT l.call_id, c.started_at FROM ledger l JOIN calls c ON c.call_id = l.call_id
             WHERE l.stage = 'pending' AND l.attempts = 0 AND l.in_flight_since IS NULL
               AND l.b24_call_id IS NULL AND l.b24_activity_id IS NULL AND l.task_id IS NULL
               AND l.call_id NOT IN (SELECT call_id FROM verified)
               AND c.started_at < ?1
             ORDER BY c.started_at",
        )?;
        let rows = st.query_map(params![ts(before)], |r| {
            Ok((
                r.get::<_, String>(0)?,
                parse_ts(&r.get::<_, String>(1)?).unwrap_or_default(),
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records that calls were looked up in Bitrix24.
    pub fn set_verified(&mut self, ids: &[String], now: DateTime<Utc>) -> Result<()> {
        let tx = self.conn.transaction()?;
        for id in ids {
            tx.execute(
                "INSERT OR IGNORE INTO verified (call_id, verified_at) VALUES (?1, ?2)",
                params![id, ts(now)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Whether the ledger holds no call at all (a new or lost state file).
    pub fn ledger_is_empty(&self) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT NOT EXISTS (SELECT 1 FROM ledger)", [], |r| r.get(0))?)
    }
}
