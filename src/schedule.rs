//! Schedules: which job runs when, in local time, correctly across DST.
//!
//! A schedule file (`schedules/default.toml`) names a `timezone` and jobs with cron expressions
//! (six fields, seconds first). tokio-cron-scheduler 0.15 freezes a `_tz` job's UTC offset when
//! the job is created, so ubsync computes fire times itself, with croner, by this rule (the one
//! Vixie cron documents):
//! - a job with a **fixed hour** (e.g. `0 30 3 * * *`) runs once per matching local day at its
//!   local time: in the spring gap at the first valid time after it (03:30 → 04:00), in the
//!   autumn overlap once, at the first occurrence;
//! - a job with a **wildcard hour** (e.g. `0 * * * * *`, every minute) keeps its cadence through
//!   both transitions: it is evaluated in the UTC offset in force, so the repeated autumn hour is
//!   not skipped and the missing spring hour is not waited for.
//!
//! Pure: fire times are a function of the schedule and an instant.

use std::path::Path;

use chrono::{DateTime, FixedOffset, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Deserialize;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// One sync pass.
    Sync,
    /// Refresh operators and inner-line statuses only.
    Lines,
    /// Reconcile the previous local day.
    Reconcile,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Sync => "sync",
            JobKind::Lines => "lines",
            JobKind::Reconcile => "reconcile",
        }
    }
}

/// One scheduled job.
#[derive(Debug, Clone)]
pub struct Job {
    pub kind: JobKind,
    pub expr: String,
    cron: croner::Cron,
    wildcard_hour: bool,
}

/// A parsed schedule file.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub timezone: Tz,
    pub jobs: Vec<Job>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    timezone: String,
    #[serde(rename = "job")]
    jobs: Vec<RawJob>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: String,
    cron: String,
}

impl Job {
    /// Parses a six-field cron expression (seconds first) for `kind`.
    pub fn new(kind: JobKind, expr: &str) -> Result<Job, String> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        if fields.len() != 6 {
            return Err(format!("`{expr}` has {} fields; write six: seconds minutes hours day-of-month month day-of-week", fields.len()));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .build()
            .parse(expr)
            .map_err(|e| format!("`{expr}` is not a cron expression ({e})"))?;
        Ok(Job {
            kind,
            expr: expr.into(),
            cron,
            wildcard_hour: fields[2].contains('*'),
        })
    }

    /// The first fire time strictly after `after`, in `tz` (see the module docs for DST).
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        if self.wildcard_hour {
            let offset: FixedOffset = tz.offset_from_utc_datetime(&after.naive_utc()).fix();
            let next = self
                .cron
                .find_next_occurrence(&after.with_timezone(&offset), false)
                .ok()?
                .with_timezone(&Utc);
            // If the offset changes before `next`, the wall clock after the change decides.
            let later: FixedOffset = tz.offset_from_utc_datetime(&next.naive_utc()).fix();
            if later != offset {
                let via_zone = self
                    .cron
                    .find_next_occurrence(&after.with_timezone(&tz), false)
                    .ok()?
                    .with_timezone(&Utc);
                return Some(next.min(via_zone));
            }
            return Some(next);
        }
        self.cron
            .find_next_occurrence(&after.with_timezone(&tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

impl Schedule {
    /// Parses schedule text; errors name the problem and the job.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let raw: RawSchedule = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let timezone: Tz = raw
            .timezone
            .parse()
            .map_err(|_| format!("timezone `{}` is not an IANA time zone", raw.timezone))?;
        let mut jobs = Vec::new();
        for j in raw.jobs {
            let kind = match j.name.as_str() {
                "sync" => JobKind::Sync,
                "lines" => JobKind::Lines,
                "reconcile" => JobKind::Reconcile,
                other => {
                    return Err(format!(
                        "job `{other}` is unknown; use sync, lines or reconcile"
                    ))
                }
            };
            jobs.push(Job::new(kind, &j.cron).map_err(|e| format!("job `{}`: {e}", j.name))?);
        }
        if jobs.is_empty() {
            return Err("no [[job]] entries".into());
        }
        Ok(Schedule { timezone, jobs })
    }

    /// The schedule built into the binary (`schedules/default.toml` of the source tree).
    pub const BUILT_IN: &'static str = include_str!("../schedules/default.toml");

    /// The schedule the daemon runs, and where it came from: the configured file; else
    /// `schedules/default.toml` beside the config when it exists; else the built-in one.
    pub fn for_config(cfg: &crate::config::Config) -> Result<(Schedule, String), String> {
        if cfg.schedule_explicit || cfg.schedule_file.exists() {
            let s = Self::load(&cfg.schedule_file)?;
            Ok((s, cfg.schedule_file.display().to_string()))
        } else {
            let s = Self::parse(Self::BUILT_IN).map_err(|e| format!("built-in schedule: {e}"))?;
            Ok((s, "built in".into()))
        }
    }

    pub fn load(path: &Path) -> Result<Schedule, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("schedule {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use chrono_tz::Europe::Kyiv;

    fn fires(job: &Job, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = from;
        while let Some(n) = job.next_after(t, Kyiv).filter(|n| *n < to) {
            out.push(n);
            t = n;
        }
        out
    }

    fn local(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Kyiv.with_ymd_and_hms(y, m, d, h, min, 0)
            .earliest()
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn the_nightly_job_fires_once_per_local_day_across_both_dst_changes() {
        let nightly = Job::new(JobKind::Reconcile, "0 30 3 * * *").unwrap();
        for (month, day) in [(3, 29), (10, 25)] {
            let all = fires(
                &nightly,
                local(2026, month, day - 2, 12, 0),
                local(2026, month, day + 2, 12, 0),
            );
            let days: Vec<_> = all
                .iter()
                .map(|t| t.with_timezone(&Kyiv).date_naive())
                .collect();
            assert_eq!(all.len(), 4, "{all:?}");
            let mut unique = days.clone();
            unique.dedup();
            assert_eq!(unique, days, "one per local day: {all:?}");
        }
        let on_change = fires(
            &nightly,
            local(2026, 10, 25, 0, 0),
            local(2026, 10, 26, 0, 0),
        );
        assert_eq!(
            on_change,
            vec![Utc.with_ymd_and_hms(2026, 10, 25, 0, 30, 0).unwrap()],
            "03:30 EEST, the first 03:30"
        );
        let on_gap = fires(&nightly, local(2026, 3, 29, 0, 0), local(2026, 3, 30, 0, 0));
        assert_eq!(on_gap.len(), 1);
        assert_eq!(
            on_gap[0].with_timezone(&Kyiv).format("%H:%M").to_string(),
            "04:00",
            "03:30 does not exist: the first valid time after"
        );
        let normal = fires(
            &nightly,
            local(2026, 11, 21, 12, 0),
            local(2026, 11, 22, 12, 0),
        );
        assert_eq!(
            normal[0]
                .with_timezone(&Kyiv)
                .format("%H:%M %z")
                .to_string(),
            "03:30 +0200"
        );
    }

    #[test]
    fn a_minute_job_keeps_its_cadence_through_the_repeated_and_the_missing_hour() {
        let minutely = Job::new(JobKind::Sync, "0 * * * * *").unwrap();
        let start = Utc.with_ymd_and_hms(2026, 10, 24, 23, 0, 0).unwrap();
        let ticks = fires(
            &minutely,
            start - Duration::seconds(1),
            start + Duration::hours(4),
        );
        assert_eq!(
            ticks.len(),
            240,
            "one a minute for four real hours over the autumn change"
        );
        assert!(ticks
            .windows(2)
            .all(|w| w[1] - w[0] == Duration::minutes(1)));
        let start = Utc.with_ymd_and_hms(2026, 3, 28, 23, 0, 0).unwrap();
        let ticks = fires(
            &minutely,
            start - Duration::seconds(1),
            start + Duration::hours(4),
        );
        assert_eq!(ticks.len(), 240, "and over the spring change");
        let half = Job::new(JobKind::Lines, "*/30 * * * * *").unwrap();
        assert_eq!(
            fires(
                &half,
                start - Duration::seconds(1),
                start + Duration::minutes(10)
            )
            .len(),
            20
        );
    }

    #[test]
    fn the_shipped_schedule_parses_and_bad_ones_say_why() {
        let s = Schedule::parse(include_str!("../schedules/default.toml")).unwrap();
        assert_eq!(s.timezone, Kyiv);
        assert_eq!(
            s.jobs.iter().map(|j| j.kind).collect::<Vec<_>>(),
            vec![JobKind::Sync, JobKind::Lines, JobKind::Reconcile]
        );
        assert!(Schedule::parse(
            "timezone = \"Mars\"\n[[job]]\nname = \"sync\"\ncron = \"0 * * * * *\""
        )
        .unwrap_err()
        .contains("Mars"));
        assert!(
            Schedule::parse("timezone = \"UTC\"\n[[job]]\nname = \"sync\"\ncron = \"* * *\"")
                .unwrap_err()
                .contains("six")
        );
        assert!(Schedule::parse(
            "timezone = \"UTC\"\n[[job]]\nname = \"dance\"\ncron = \"0 * * * * *\""
        )
        .unwrap_err()
        .contains("dance"));
    }
}
