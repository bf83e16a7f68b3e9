//! Working hours: a weekly calendar in one time zone, with holidays. Missed calls outside the
//! hours get their task deadline from the next opening, not from 3 a.m.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// What happens to a missed call's task outside working hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterHours {
    /// The task is created at once, its deadline counted from the next opening.
    #[default]
    Deadline,
    /// The task is created only once the office opens (deadline counted from the opening).
    Wait,
}

/// The office's calendar.
#[derive(Debug, Clone, PartialEq)]
pub struct Hours {
    pub tz: Tz,
    /// Open weekdays, Monday first.
    pub days: [bool; 7],
    pub open: NaiveTime,
    pub close: NaiveTime,
    pub holidays: HashSet<NaiveDate>,
    pub after_hours: AfterHours,
}

/// Longest search for an opening (a calendar with every day a holiday never opens).
const SEARCH_DAYS: i64 = 400;

impl Hours {
    fn open_on(&self, d: NaiveDate) -> bool {
        self.days[d.weekday().num_days_from_monday() as usize] && !self.holidays.contains(&d)
    }

    /// The instant a local wall-clock time happens on `d`; a time skipped by a DST change is
    /// taken as the first instant after the gap.
    fn instant(&self, d: NaiveDate, t: NaiveTime) -> DateTime<Utc> {
        let mut local = d.and_time(t);
        for _ in 0..180 {
            if let Some(x) = self.tz.from_local_datetime(&local).earliest() {
                return x.with_timezone(&Utc);
            }
            local += Duration::minutes(1);
        }
        Utc.from_utc_datetime(&d.and_time(t))
    }

    /// Whether the office is open at `t`.
    pub fn is_open(&self, t: DateTime<Utc>) -> bool {
        let local = t.with_timezone(&self.tz);
        let d = local.date_naive();
        self.open_on(d) && t >= self.instant(d, self.open) && t < self.instant(d, self.close)
    }

    /// `t` itself when the office is open then, else the next opening. `None` when the
    /// calendar does not open within a year.
    pub fn next_open(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.is_open(t) {
            return Some(t);
        }
        let first = t.with_timezone(&self.tz).date_naive();
        (0..SEARCH_DAYS)
            .map(|i| first + Duration::days(i))
            .filter(|d| self.open_on(*d))
            .map(|d| self.instant(d, self.open))
            .find(|o| *o > t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kyiv() -> Hours {
        Hours {
            tz: chrono_tz::Europe::Kyiv,
            days: [true, true, true, true, true, false, false],
            open: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
            close: NaiveTime::from_hms_opt(18, 0, 0).unwrap(),
            holidays: [NaiveDate::from_ymd_opt(2026, 12, 25).unwrap()].into(),
            after_hours: AfterHours::Deadline,
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn inside_hours_is_now_and_outside_is_the_next_opening() {
        let h = kyiv();
        // Tuesday 2026-11-24 12:00 Kyiv (UTC+2) = 10:00 UTC: open.
        let t = utc("2026-11-24T10:00:00Z");
        assert!(h.is_open(t));
        assert_eq!(h.next_open(t), Some(t));
        // 03:00 Kyiv the same day → 09:00 Kyiv = 07:00 UTC.
        assert_eq!(
            h.next_open(utc("2026-11-24T01:00:00Z")),
            Some(utc("2026-11-24T07:00:00Z"))
        );
        // Friday 19:00 Kyiv → Monday 09:00.
        assert_eq!(
            h.next_open(utc("2026-11-27T17:00:00Z")),
            Some(utc("2026-11-30T07:00:00Z"))
        );
        // 18:00 sharp is closed.
        assert!(!h.is_open(utc("2026-11-24T16:00:00Z")));
    }

    #[test]
    fn holidays_are_skipped() {
        let h = kyiv();
        // Thursday 2026-12-24 20:00 Kyiv → Friday the 25th is a holiday → Monday the 28th.
        assert_eq!(
            h.next_open(utc("2026-12-24T18:00:00Z")),
            Some(utc("2026-12-28T07:00:00Z"))
        );
    }

    #[test]
    fn the_opening_follows_daylight_saving_time() {
        let h = kyiv();
        // Saturday 2026-03-28 night; DST starts Sunday 03:00 → Monday 09:00 is UTC+3 = 06:00 UTC.
        assert_eq!(
            h.next_open(utc("2026-03-28T22:00:00Z")),
            Some(utc("2026-03-30T06:00:00Z"))
        );
        // Autumn: Friday 2026-10-23 evening → Monday 2026-10-26 09:00 is UTC+2 again.
        assert_eq!(
            h.next_open(utc("2026-10-23T17:00:00Z")),
            Some(utc("2026-10-26T07:00:00Z"))
        );
        // An opening inside the spring gap (03:30 does not exist on 2026-03-29) moves past it.
        let mut night = kyiv();
        night.days = [true; 7];
        night.open = NaiveTime::from_hms_opt(3, 30, 0).unwrap();
        assert_eq!(
            night.next_open(utc("2026-03-28T23:00:00Z")),
            Some(utc("2026-03-29T01:00:00Z")),
            "04:00 summer time, the first instant after the gap"
        );
    }

    #[test]
    fn a_calendar_that_never_opens_says_so() {
        let mut h = kyiv();
        h.days = [false; 7];
        assert_eq!(h.next_open(utc("2026-11-24T10:00:00Z")), None);
    }
}
