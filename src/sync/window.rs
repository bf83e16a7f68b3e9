//! Which stretches of time a pass pulls, and how a stretch is asked of Unitalk.
//!
//! A pass covers `[cursor − lookback, now − settle)` in windows of at most `max_window`. Unitalk
//! is asked in wall-clock time; at a DST transition the wall-clock range of a window is widened to
//! every wall-clock reading that could name an instant inside it (see `timezone.rs` for how such
//! readings are resolved), so no call is missed in a gap or an overlap. Pure functions.

use chrono::{DateTime, Duration, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

/// A half-open stretch of time `[start, end)` pulled in one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// The windows a pass covers, oldest first.
pub fn plan_windows(
    cursor: DateTime<Utc>,
    lookback: Duration,
    settle: Duration,
    max_window: Duration,
    now: DateTime<Utc>,
) -> Vec<SyncWindow> {
    let from = cursor - lookback;
    let to = now - settle;
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + max_window).min(to);
        out.push(SyncWindow { start, end });
        start = end;
    }
    out
}

/// Narrow windows around call start times (for re-checks of single calls): each start widened
/// by `pad` on both sides, neighbours closer than `gap` merged, no window longer than
/// `max_window` (a longer run is split). `starts` need not be sorted.
pub fn merge_ranges(
    starts: &[DateTime<Utc>],
    pad: Duration,
    gap: Duration,
    max_window: Duration,
) -> Vec<SyncWindow> {
    let mut sorted = starts.to_vec();
    sorted.sort();
    let mut out: Vec<SyncWindow> = Vec::new();
    for t in sorted {
        let (start, end) = (t - pad, t + pad);
        match out.last_mut() {
            Some(w) if start <= w.end + gap && end - w.start <= max_window => {
                w.end = w.end.max(end)
            }
            _ => out.push(SyncWindow { start, end }),
        }
    }
    out
}

/// The inclusive wall-clock range (`dateFrom`, `dateTo`) that asks Unitalk for `w`.
pub fn wall_range(w: SyncWindow, tz: Tz) -> (NaiveDateTime, NaiveDateTime) {
    let last = w.end - Duration::seconds(1);
    let offsets = [
        w.start - Duration::hours(3),
        w.start,
        last,
        w.end + Duration::hours(3),
    ]
    .map(|t| tz.offset_from_utc_datetime(&t.naive_utc()).fix());
    let lo = offsets
        .iter()
        .map(|o| w.start.naive_utc() + *o)
        .min()
        .expect("non-empty");
    let hi = offsets
        .iter()
        .map(|o| last.naive_utc() + *o)
        .max()
        .expect("non-empty");
    (lo, hi.max(lo))
}

/// `YYYY-MM-DD HH:MM:SS`, as Unitalk wants dates.
pub fn unitalk_date(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use chrono_tz::Europe::Kyiv;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_pass_covers_cursor_minus_lookback_to_now_minus_settle_in_bounded_windows() {
        let w = plan_windows(
            t("2026-11-22T10:00:00Z"),
            Duration::minutes(10),
            Duration::minutes(2),
            Duration::hours(1),
            t("2026-11-22T12:00:00Z"),
        );
        assert_eq!(w.len(), 3);
        assert_eq!(
            w[0],
            SyncWindow {
                start: t("2026-11-22T09:50:00Z"),
                end: t("2026-11-22T10:50:00Z")
            }
        );
        assert_eq!(
            w[2],
            SyncWindow {
                start: t("2026-11-22T11:50:00Z"),
                end: t("2026-11-22T11:58:00Z")
            }
        );
        assert!(plan_windows(
            t("2026-11-22T12:00:00Z"),
            Duration::zero(),
            Duration::minutes(2),
            Duration::hours(1),
            t("2026-11-22T12:01:00Z")
        )
        .is_empty());
    }

    #[test]
    fn an_ordinary_window_asks_exactly_its_wall_clock_range() {
        let (lo, hi) = wall_range(
            SyncWindow {
                start: t("2026-11-22T08:00:00Z"),
                end: t("2026-11-22T09:00:00Z"),
            },
            Kyiv,
        );
        assert_eq!(
            (unitalk_date(lo), unitalk_date(hi)),
            ("2026-11-22 10:00:00".into(), "2026-11-22 10:59:59".into())
        );
    }

    #[test]
    fn a_window_before_the_spring_gap_also_asks_for_the_times_that_do_not_exist() {
        // 2026-03-29: 03:00 EET jumps to 04:00 EEST at 01:00Z.
        let (lo, hi) = wall_range(
            SyncWindow {
                start: t("2026-03-29T00:00:00Z"),
                end: t("2026-03-29T01:00:00Z"),
            },
            Kyiv,
        );
        assert_eq!(unitalk_date(lo), "2026-03-29 02:00:00");
        assert_eq!(unitalk_date(hi), "2026-03-29 03:59:59");
        let gap_call = crate::timezone::local_to_utc(
            NaiveDateTime::parse_from_str("2026-03-29 03:30:00", "%Y-%m-%d %H:%M:%S").unwrap(),
            Kyiv,
        );
        assert!(
            gap_call >= t("2026-03-29T01:00:00Z"),
            "it lands in the next window, which must ask for it too"
        );
        let (lo2, _) = wall_range(
            SyncWindow {
                start: t("2026-03-29T01:00:00Z"),
                end: t("2026-03-29T02:00:00Z"),
            },
            Kyiv,
        );
        assert!(unitalk_date(lo2).as_str() <= "2026-03-29 03:30:00");
    }

    #[test]
    fn both_windows_around_the_autumn_overlap_ask_for_the_repeated_hour() {
        // 2026-10-25: 04:00 EEST falls back to 03:00 EET at 01:00Z; 03:00–03:59 happens twice.
        for start in ["2026-10-25T00:00:00Z", "2026-10-25T01:00:00Z"] {
            let s = t(start);
            let (lo, hi) = wall_range(
                SyncWindow {
                    start: s,
                    end: s + Duration::hours(1),
                },
                Kyiv,
            );
            assert!(
                unitalk_date(lo).as_str() <= "2026-10-25 03:00:00",
                "{start}"
            );
            assert!(
                unitalk_date(hi).as_str() >= "2026-10-25 03:59:59",
                "{start}"
            );
        }
        let _ = Kyiv.with_ymd_and_hms(2026, 10, 25, 3, 0, 0);
    }

    #[test]
    fn narrow_ranges_merge_neighbours_and_stay_bounded() {
        let t =
            |m: i64| Utc.with_ymd_and_hms(2026, 11, 22, 9, 0, 0).unwrap() + Duration::minutes(m);
        let w = merge_ranges(
            &[t(30), t(0), t(5), t(200), t(206), t(212), t(218)],
            Duration::minutes(1),
            Duration::minutes(10),
            Duration::minutes(15),
        );
        assert_eq!(
            w,
            vec![
                SyncWindow {
                    start: t(-1),
                    end: t(6)
                },
                SyncWindow {
                    start: t(29),
                    end: t(31)
                },
                SyncWindow {
                    start: t(199),
                    end: t(213)
                },
                SyncWindow {
                    start: t(217),
                    end: t(219)
                },
            ]
        );
        assert!(
            merge_ranges(&[], Duration::zero(), Duration::zero(), Duration::hours(1)).is_empty()
        );
    }
}
