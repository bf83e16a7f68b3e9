//! Wall-clock time in a named zone to instants and back, with DST handled one documented way.
//!
//! Unitalk speaks local wall-clock time with no offset. Twice a year that is not a function:
//! - **Gap** (spring forward, e.g. 03:00–04:00 on 2026-03-29 in Europe/Kyiv does not exist): the
//!   time is read with the offset in force *before* the gap, so 03:30 becomes 01:30Z, shown as
//!   04:30 EEST. The order of calls is kept and nothing is rejected.
//! - **Overlap** (fall back, e.g. 03:00–04:00 on 2026-10-25 happens twice): the *earlier* instant
//!   (summer offset) is chosen.
//!
//! For window bounds this errs on the side of pulling more: a window's start read in the gap or
//! overlap is never later than the instant it names. Pure functions.

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The instant a wall-clock time in `tz` names (see the module docs for gaps and overlaps).
pub fn local_to_utc(naive: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
        LocalResult::None => {
            // Every real gap is shorter than three hours; the offset in force before it is the
            // one of a moment safely earlier.
            let before = tz
                .from_local_datetime(&(naive - Duration::hours(3)))
                .earliest()
                .map(|t| t.offset().fix())
                .unwrap_or_else(|| chrono::FixedOffset::east_opt(0).expect("zero offset"));
            DateTime::<Utc>::from_naive_utc_and_offset(naive - before, Utc)
        }
    }
}

/// The wall-clock time in `tz` of an instant, formatted as Unitalk wants (`YYYY-MM-DD HH:MM:SS`).
pub fn unitalk_wall_clock(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S").to_string()
}

/// RFC 3339 with an explicit offset in `tz` and no fractional seconds, as Bitrix24 wants.
pub fn rfc3339_in(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz)
        .format("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

use chrono::Offset;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Europe::Kyiv;

    fn n(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    #[test]
    fn ordinary_times_use_the_zone_offset() {
        assert_eq!(
            local_to_utc(n("2026-07-01 12:00:00"), Kyiv).to_rfc3339(),
            "2026-07-01T09:00:00+00:00"
        );
        assert_eq!(
            local_to_utc(n("2026-01-01 12:00:00"), Kyiv).to_rfc3339(),
            "2026-01-01T10:00:00+00:00"
        );
    }

    #[test]
    fn a_time_in_the_spring_gap_uses_the_offset_before_the_gap() {
        let t = local_to_utc(n("2026-03-29 03:30:00"), Kyiv);
        assert_eq!(t.to_rfc3339(), "2026-03-29T01:30:00+00:00");
        assert_eq!(rfc3339_in(t, Kyiv), "2026-03-29T04:30:00+03:00");
    }

    #[test]
    fn a_time_in_the_autumn_overlap_is_the_earlier_instant() {
        let t = local_to_utc(n("2026-10-25 03:30:00"), Kyiv);
        assert_eq!(t.to_rfc3339(), "2026-10-25T00:30:00+00:00");
        assert_eq!(rfc3339_in(t, Kyiv), "2026-10-25T03:30:00+03:00");
    }

    #[test]
    fn wall_clock_round_trips_outside_transitions() {
        let t = local_to_utc(n("2026-11-22 08:15:00"), Kyiv);
        assert_eq!(unitalk_wall_clock(t, Kyiv), "2026-11-22 08:15:00");
    }
}
