//! Inner lines as `ubsync lines` and the line alerts see them: Unitalk's status (with how long
//! it has held) joined with the operator and the Bitrix24 user the line maps to.

use chrono::{DateTime, Utc};
use rusqlite::params;

use super::{parse_ts, Result, Store};

/// One inner line.
#[derive(Debug, Clone, PartialEq)]
pub struct LineRow {
    pub line: String,
    /// Unitalk's status, when `/phones/inner` reported one.
    pub status: Option<String>,
    pub observed_at: Option<DateTime<Utc>>,
    /// Since when the line has had this status (by observation time).
    pub status_since: Option<DateTime<Utc>>,
    pub alerted: bool,
    /// The operator's name in Unitalk.
    pub operator: Option<String>,
    /// The Bitrix24 user with this `UF_PHONE_INNER`: `Some(None)` looked up, nobody.
    pub b24_user: Option<Option<i64>>,
}

impl Store {
    /// Every line Unitalk reported a status for or that belongs to an operator, by line.
    pub fn lines(&self) -> Result<Vec<LineRow>> {
        let mut st = self.conn.prepare(
            "SELECT l.line, s.status, s.observed_at, s.status_since, COALESCE(s.alerted, 0),
                    o.first_name, o.last_name, o.b24_user_id, o.resolved_at
             FROM (SELECT line FROM line_status UNION SELECT line FROM operators) l
             LEFT JOIN line_status s ON s.line = l.line
             LEFT JOIN operators o ON o.line = l.line
             ORDER BY length(l.line), l.line",
        )?;
        let rows = st.query_map([], |r| {
            let t = |i: usize| -> rusqlite::Result<Option<DateTime<Utc>>> {
                Ok(r.get::<_, Option<String>>(i)?.as_deref().and_then(parse_ts))
            };
            let first: Option<String> = r.get(5)?;
            let last: Option<String> = r.get(6)?;
            let name = [first, last]
                .into_iter()
                .flatten()
                .filter(|s| !s.trim().is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let resolved: Option<String> = r.get(8)?;
            Ok(LineRow {
                line: r.get(0)?,
                status: r.get(1)?,
                observed_at: t(2)?,
                status_since: t(3)?,
                alerted: r.get::<_, i64>(4)? != 0,
                operator: Some(name).filter(|n| !n.is_empty()),
                b24_user: resolved.map(|_| r.get(7)).transpose()?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records whether supervisors were told `line` is offline.
    pub fn set_line_alerted(&self, line: &str, alerted: bool) -> Result<()> {
        self.conn.execute(
            "UPDATE line_status SET alerted = ?2 WHERE line = ?1",
            params![line, alerted],
        )?;
        Ok(())
    }
}
