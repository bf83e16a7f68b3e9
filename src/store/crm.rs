//! CRM lookups remembered across passes (`crm_lookup`): the entity, and its responsible when
//! known, of a client number. Only hits are kept; they expire after `sync.crm_cache`.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use rusqlite::params;

use super::{parse_ts, ts, Result, Store};

/// A remembered lookup: entity kind and id, and the responsible user when known.
#[derive(Debug, Clone, PartialEq)]
pub struct CrmHit {
    pub kind: String,
    pub id: i64,
    pub responsible: Option<i64>,
}

impl Store {
    /// The remembered hits among `numbers` younger than `max_age`.
    pub fn crm_hits(
        &self,
        numbers: &[String],
        now: DateTime<Utc>,
        max_age: Duration,
    ) -> Result<HashMap<String, CrmHit>> {
        let mut out = HashMap::new();
        if max_age <= Duration::zero() {
            return Ok(out);
        }
        let mut st = self.conn.prepare(
            "SELECT entity_type, entity_id, responsible_id, looked_up_at FROM crm_lookup WHERE number = ?1",
        )?;
        for n in numbers {
            let row = st
                .query_row([n], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })
                .ok();
            if let Some((kind, id, responsible, at)) = row {
                if parse_ts(&at).is_some_and(|t| now - t < max_age) {
                    out.insert(
                        n.clone(),
                        CrmHit {
                            kind,
                            id,
                            responsible,
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    /// Remembers what Bitrix24 answered for these numbers.
    pub fn remember_crm(&mut self, hits: &[(String, CrmHit)], now: DateTime<Utc>) -> Result<()> {
        let tx = self.conn.transaction()?;
        for (n, h) in hits {
            tx.execute(
                "INSERT INTO crm_lookup (number, entity_type, entity_id, responsible_id, looked_up_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(number) DO UPDATE SET entity_type = ?2, entity_id = ?3,
                   responsible_id = ?4, looked_up_at = ?5",
                params![n, h.kind, h.id, h.responsible, ts(now)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_are_remembered_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.db")).unwrap();
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let hit = CrmHit {
            kind: "CONTACT".into(),
            id: 7,
            responsible: Some(11),
        };
        s.remember_crm(&[("+380501112233".into(), hit.clone())], t)
            .unwrap();
        let n = vec!["+380501112233".to_string(), "+380670000000".to_string()];
        let got = s
            .crm_hits(&n, t + Duration::minutes(5), Duration::minutes(10))
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got["+380501112233"], hit);
        assert!(s
            .crm_hits(&n, t + Duration::minutes(11), Duration::minutes(10))
            .unwrap()
            .is_empty());
        assert!(s.crm_hits(&n, t, Duration::zero()).unwrap().is_empty());
    }
}
