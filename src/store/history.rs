//! What happened, for people: the run log listed, and one call's story (its record, ledger row,
//! quarantine entries and recording watch), for `ubsync runs` and `ubsync show`.

use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};

use super::ledger::{LedgerRow, QuarantineEntry};
use super::{parse_ts, Result, RunRecord, Store};

/// Everything the store knows about one call.
#[derive(Debug, Clone)]
pub struct CallStory {
    pub call_id: String,
    pub started_at: DateTime<Utc>,
    /// The record as Unitalk last sent it.
    pub raw: String,
    pub observed_at: DateTime<Utc>,
    pub first_seen_at: DateTime<Utc>,
    pub ledger: Option<LedgerRow>,
    /// Every quarantine entry of the call, released or not: (entry, released at).
    pub quarantine: Vec<(QuarantineEntry, Option<DateTime<Utc>>)>,
    /// Recording watch: (state, until, checks).
    pub recording: Option<(String, DateTime<Utc>, i64)>,
    pub verified_at: Option<DateTime<Utc>>,
}

impl Store {
    /// The latest runs, newest first; of one job when given.
    pub fn runs(&self, job: Option<&str>, limit: usize) -> Result<Vec<RunRecord>> {
        let mut st = self.conn.prepare(
            "SELECT id, job, started_at, finished_at, outcome, summary, error FROM runs
             WHERE (?1 IS NULL OR job = ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![job, limit as i64], super::run_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many calls the store holds that started in `[from, to)`.
    /// Stored calls that started in `[from, to)`, oldest first, at most `limit`: id and record.
    pub fn stored_calls(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<(String, String)>> {
        let mut st = self.conn.prepare(
            "SELECT call_id, raw FROM calls WHERE started_at >= ?1 AND started_at < ?2
             ORDER BY started_at, call_id LIMIT ?3",
        )?;
        let rows = st.query_map(params![super::ts(from), super::ts(to), limit as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A stored call's record.
    pub fn stored_call(&self, call_id: &str) -> Result<Option<String>> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .query_row("SELECT raw FROM calls WHERE call_id = ?1", [call_id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    pub fn calls_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM calls WHERE started_at >= ?1 AND started_at < ?2",
            params![super::ts(from), super::ts(to)],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Ids of the calls `what` names: a Unitalk id, an `EXTERNAL_CALL_ID` (`unitalk-<id>`), or
    /// a phone number (the digits match the end of the record's `from` or `to`), newest first.
    pub fn find_calls(&self, what: &str, limit: usize) -> Result<Vec<String>> {
        let id = what.strip_prefix("unitalk-").unwrap_or(what);
        let exact: Option<String> = self
            .conn
            .query_row("SELECT call_id FROM calls WHERE call_id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(id) = exact {
            return Ok(vec![id]);
        }
        let digits: String = what.chars().filter(char::is_ascii_digit).collect();
        if digits.len() < 3 {
            return Ok(Vec::new());
        }
        // The last nine digits identify a number whatever its prefix (+380, 0, 380).
        let tail = &digits[digits.len().saturating_sub(9)..];
        let mut st = self.conn.prepare(
            "SELECT call_id, raw FROM calls WHERE raw LIKE '%' || ?1 || '%' ORDER BY started_at DESC",
        )?;
        let mut out = Vec::new();
        for row in st.query_map([tail], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })? {
            let (id, raw) = row?;
            let v: serde_json::Value = serde_json::from_str(&raw).unwrap_or_default();
            let mut numbers = vec![v.get("from").cloned().unwrap_or_default()];
            if let Some(to) = v.get("to") {
                match to {
                    serde_json::Value::Array(a) => numbers.extend(a.iter().cloned()),
                    other => numbers.push(other.clone()),
                }
            }
            let hit = numbers.iter().any(|n| {
                let n: String = match n {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
                !n.is_empty() && n.ends_with(tail)
            });
            if hit {
                out.push(id);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// One call's story, if the store has seen it.
    pub fn call_story(&self, call_id: &str) -> Result<Option<CallStory>> {
        let base = self
            .conn
            .query_row(
                "SELECT started_at, raw, observed_at, first_seen_at FROM calls WHERE call_id = ?1",
                [call_id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((started, raw, observed, first)) = base else {
            return Ok(None);
        };
        let mut st = self.conn.prepare(
            "SELECT id, source, call_id, raw, reason, created_at, released_at FROM quarantine
             WHERE call_id = ?1 ORDER BY id",
        )?;
        let quarantine = st
            .query_map([call_id], |r| {
                Ok((
                    QuarantineEntry {
                        id: r.get(0)?,
                        source: r.get(1)?,
                        call_id: r.get(2)?,
                        raw: r.get(3)?,
                        reason: r.get(4)?,
                        created_at: parse_ts(&r.get::<_, String>(5)?).unwrap_or_default(),
                    },
                    r.get::<_, Option<String>>(6)?.as_deref().and_then(parse_ts),
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let recording = self
            .conn
            .query_row(
                "SELECT state, until, checks FROM recording_watch WHERE call_id = ?1",
                [call_id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        parse_ts(&r.get::<_, String>(1)?).unwrap_or_default(),
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()?;
        let verified_at = self
            .conn
            .query_row(
                "SELECT verified_at FROM verified WHERE call_id = ?1",
                [call_id],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .as_deref()
            .and_then(parse_ts);
        Ok(Some(CallStory {
            call_id: call_id.to_string(),
            started_at: parse_ts(&started).unwrap_or_default(),
            raw,
            observed_at: parse_ts(&observed).unwrap_or_default(),
            first_seen_at: parse_ts(&first).unwrap_or_default(),
            ledger: self.ledger_row(call_id)?,
            quarantine,
            recording,
            verified_at,
        }))
    }
}
