//! The client-side request budget for one portal (`bitrix24-api.md` §2).
//!
//! [`RequestBudget`] is the gate every Bitrix24 request passes (a batch is one request): the
//! portal's leaky bucket mirrored by governor (`burst`, `per_second`), a strict cap of
//! `max_per_10s` requests in any 10-second window, and an adaptive spacing that grows after
//! each 503 `QUERY_LIMIT_EXCEEDED` (another app on the same IP is using the bucket) and shrinks
//! again with each success. [`OperatingTracker`] follows each method's `time.operating` and
//! `operating_reset_at`, slows a method down as it nears its budget, and pauses it after a 429
//! `OPERATION_TIME_LIMIT` until the portal says the budget resets.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

/// The window `max_per_10s` is counted over at the client: ten seconds plus a margin, because
/// the portal counts arrivals, and a request let through later can arrive sooner than one let
/// through before it (latency jitter, retries, probes). With a second of margin, arrival times
/// at the portal stay within `max_per_10s` in any ten seconds while latency varies by less.
const WINDOW: Duration = Duration::from_millis(11_000);

/// The gate in front of every request to one portal.
pub struct RequestBudget {
    bucket: DefaultDirectRateLimiter,
    max_per_10s: usize,
    /// Spacing bounds after 503s: half and eight times the retry base delay.
    min_penalty: Duration,
    max_penalty: Duration,
    state: Mutex<BudgetState>,
    /// Total time requests waited at the gate, in milliseconds.
    pub waited_ms: AtomicU64,
    /// Requests that had to wait (50 ms or more) before they were sent.
    pub waited_requests: AtomicU64,
}

struct BudgetState {
    /// When the last `max_per_10s` requests were let through.
    recent: VecDeque<Instant>,
    /// Extra spacing between requests after 503s.
    penalty: Duration,
    last: Option<Instant>,
}

/// Requests of the portal's bucket the client leaves unused: a second's drain, between one and a
/// tenth of the bucket.
fn headroom(burst: NonZeroU32, per_second: NonZeroU32) -> u32 {
    per_second.get().min(burst.get() / 10).max(1)
}

impl RequestBudget {
    /// `retry_base` scales the spacing after 503s (from half of it up to eight times it).
    pub fn new(
        burst: NonZeroU32,
        per_second: NonZeroU32,
        max_per_10s: NonZeroU32,
        retry_base: Duration,
    ) -> Self {
        Self {
            // A second's drain of headroom, at least one request and at most a tenth of the
            // bucket: our bucket and the portal's drain on different clocks, a portal may drain
            // in whole seconds rather than continuously, and a request admitted on the last
            // slot here can arrive a moment early there. (50 and 2/s: 48.)
            bucket: RateLimiter::direct(
                Quota::per_second(per_second).allow_burst(
                    NonZeroU32::new(
                        burst
                            .get()
                            .saturating_sub(headroom(burst, per_second))
                            .max(1),
                    )
                    .expect("at least one"),
                ),
            ),
            max_per_10s: max_per_10s.get() as usize,
            min_penalty: retry_base / 2,
            max_penalty: retry_base * 8,
            state: Mutex::new(BudgetState {
                recent: VecDeque::new(),
                penalty: Duration::ZERO,
                last: None,
            }),
            waited_ms: AtomicU64::new(0),
            waited_requests: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until one more request fits every limit, and counts it.
    pub async fn acquire(&self) {
        let started = Instant::now();
        self.bucket.until_ready().await;
        loop {
            let wait = {
                let mut st = self.lock();
                let now = Instant::now();
                while st
                    .recent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= WINDOW)
                {
                    st.recent.pop_front();
                }
                let window_wait = if st.recent.len() >= self.max_per_10s {
                    WINDOW.saturating_sub(now.duration_since(st.recent[0]))
                } else {
                    Duration::ZERO
                };
                let penalty_wait = st.last.map_or(Duration::ZERO, |l| {
                    st.penalty.saturating_sub(now.duration_since(l))
                });
                let wait = window_wait.max(penalty_wait);
                if wait.is_zero() {
                    st.recent.push_back(now);
                    st.last = Some(now);
                }
                wait
            };
            if wait.is_zero() {
                break;
            }
            tokio::time::sleep(wait).await;
        }
        let waited = started.elapsed();
        self.waited_ms
            .fetch_add(waited.as_millis() as u64, Ordering::Relaxed);
        if waited >= Duration::from_millis(50) {
            self.waited_requests.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes `n` requests out of the bucket at once (as many as it holds): requests an earlier
    /// process sent that the portal's bucket still counts.
    pub fn preload(&self, n: u32) {
        for _ in 0..n {
            if self.bucket.check().is_err() {
                break;
            }
        }
    }

    /// The portal refused a request with 503: space requests further apart.
    pub fn on_rate_limited(&self) {
        let mut st = self.lock();
        st.penalty = (st.penalty * 2).clamp(self.min_penalty, self.max_penalty);
        tracing::info!(
            spacing_ms = st.penalty.as_millis() as u64,
            "Bitrix24 rate limit hit; slowing down"
        );
    }

    /// A request went through: recover the sending rate gradually.
    pub fn on_success(&self) {
        let mut st = self.lock();
        if !st.penalty.is_zero() {
            st.penalty = st.penalty.mul_f64(0.8);
            if st.penalty < self.min_penalty / 10 {
                st.penalty = Duration::ZERO;
            }
        }
    }

    /// The current extra spacing (zero when the portal is not pushing back).
    pub fn penalty(&self) -> Duration {
        self.lock().penalty
    }
}

/// The portal's leaky bucket as this client last left it (`bitrix24-api.md` §2.1): how many
/// requests it held at `at`. Kept in the state, so a process started right after another (a
/// timer's next pass, a restart, `reconcile` after `sync`) does not take a full bucket for
/// granted while the portal's is still full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketLevel {
    pub level: f64,
    pub at: DateTime<Utc>,
}

impl BucketLevel {
    /// The level after one more request at `now`, given the portal drains `per_second`.
    pub fn after_request(self, now: DateTime<Utc>, per_second: f64) -> Self {
        Self {
            level: self.drained_to(now, per_second) + 1.0,
            at: now,
        }
    }

    /// The level left at `now`.
    pub fn drained_to(self, now: DateTime<Utc>, per_second: f64) -> f64 {
        let secs = (now - self.at).num_milliseconds().max(0) as f64 / 1000.0;
        (self.level - secs * per_second).max(0.0)
    }

    /// `level at` as kept in the state.
    pub fn encode(self) -> String {
        format!("{:.3} {}", self.level, self.at.timestamp_millis())
    }

    pub fn decode(s: &str) -> Option<Self> {
        let (level, at) = s.split_once(' ')?;
        Some(Self {
            level: level.parse().ok()?,
            at: DateTime::from_timestamp_millis(at.parse().ok()?)?,
        })
    }
}

#[derive(Debug, Clone, Default)]
struct MethodBudget {
    operating: f64,
    reset_at: Option<i64>,
    paused_until: Option<DateTime<Utc>>,
}

/// Per-method operating-time budgets (§2.2), fed from `time` blocks of responses.
pub struct OperatingTracker {
    limit: f64,
    methods: Mutex<HashMap<String, MethodBudget>>,
}

impl OperatingTracker {
    /// `limit`: seconds of execution time per method per 10 minutes (480 in the cloud).
    pub fn new(limit: f64) -> Self {
        Self {
            limit,
            methods: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MethodBudget>> {
        self.methods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what a response said about `method`'s budget.
    pub fn observe(&self, method: &str, operating: Option<f64>, reset_at: Option<i64>) {
        if operating.is_none() && reset_at.is_none() {
            return;
        }
        let mut m = self.lock();
        let b = m.entry(method.to_lowercase()).or_default();
        if let Some(o) = operating {
            b.operating = o;
        }
        if reset_at.is_some() {
            b.reset_at = reset_at;
        }
    }

    /// After a 429: no more calls of `method` until the budget resets (the last
    /// `operating_reset_at` seen, else the documented window: ten minutes from now).
    pub fn pause(&self, method: &str, now: DateTime<Utc>) -> DateTime<Utc> {
        let mut m = self.lock();
        let b = m.entry(method.to_lowercase()).or_default();
        let until = b
            .reset_at
            .and_then(|t| DateTime::from_timestamp(t, 0))
            .filter(|t| *t > now)
            .unwrap_or(now + chrono::Duration::minutes(10))
            .min(now + chrono::Duration::minutes(10));
        b.paused_until = Some(until);
        tracing::warn!(%method, until = %until, "Bitrix24 paused this method (429 OPERATION_TIME_LIMIT); other work continues");
        until
    }

    /// Takes up a pause that an earlier process recorded (`paused`), unless it has ended.
    pub fn restore(&self, method: &str, until: DateTime<Utc>, now: DateTime<Utc>) {
        if until > now {
            self.lock()
                .entry(method.to_lowercase())
                .or_default()
                .paused_until = Some(until);
        }
    }

    /// Every method paused at `now`, with its end: what a later process must honour too.
    pub fn paused(&self, now: DateTime<Utc>) -> Vec<(String, DateTime<Utc>)> {
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .filter_map(|(m, b)| b.paused_until.filter(|t| *t > now).map(|t| (m.clone(), t)))
            .collect();
        out.sort();
        out
    }

    /// Until when `method` is paused, if it is.
    pub fn paused_until(&self, method: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.lock()
            .get(&method.to_lowercase())
            .and_then(|b| b.paused_until)
            .filter(|t| *t > now)
    }

    /// How long to wait before calling `method`: nothing below 80 % of the budget; above it, 1 %
    /// of the time left until the oldest minute of usage drops out, at most 7 seconds.
    pub fn slowdown(&self, method: &str, now: DateTime<Utc>) -> Duration {
        let m = self.lock();
        let Some(b) = m.get(&method.to_lowercase()) else {
            return Duration::ZERO;
        };
        if b.operating < self.limit * 0.8 {
            return Duration::ZERO;
        }
        let left = b
            .reset_at
            .map(|r| (r - now.timestamp()).max(0) as f64)
            .unwrap_or(60.0);
        Duration::from_secs_f64((left * 0.01).min(7.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_max_per_10s_requests_in_any_ten_seconds() {
        // A generous bucket, so only the 10-second cap binds.
        let b = RequestBudget::new(nz(1000), nz(1000), nz(5), Duration::from_secs(1));
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..12 {
            b.acquire().await;
            times.push(start.elapsed());
        }
        for w in times.windows(6) {
            assert!(w[5] - w[0] >= WINDOW, "6 requests within 10 s: {times:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn arrivals_stay_within_the_cap_while_latency_varies_by_up_to_a_second() {
        // Requests reach the portal after 0..900 ms: one let through later may arrive sooner.
        let b = RequestBudget::new(nz(1000), nz(1000), nz(50), Duration::from_secs(1));
        let start = Instant::now();
        let mut arrivals = Vec::new();
        for i in 0..300u64 {
            b.acquire().await;
            let latency = Duration::from_millis((i * 7919) % 900);
            arrivals.push(start.elapsed() + latency);
        }
        arrivals.sort();
        for w in arrivals.windows(51) {
            assert!(
                w[50] - w[0] >= Duration::from_secs(10),
                "51 arrivals within 10 s at the portal"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_widens_the_spacing_and_successes_recover_it() {
        let b = RequestBudget::new(nz(1000), nz(1000), nz(1000), Duration::from_secs(1));
        b.on_rate_limited();
        assert_eq!(b.penalty(), Duration::from_millis(500));
        b.on_rate_limited();
        assert_eq!(b.penalty(), Duration::from_secs(1));
        b.acquire().await;
        let t = Instant::now();
        b.acquire().await;
        assert!(t.elapsed() >= Duration::from_secs(1));
        for _ in 0..20 {
            b.on_success();
        }
        assert_eq!(b.penalty(), Duration::ZERO);
    }

    #[test]
    fn a_method_over_its_budget_is_paused_until_the_reset_and_slowed_near_it() {
        let now = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let t = OperatingTracker::new(480.0);
        t.observe("crm.lead.list", Some(100.0), Some(1_000_300));
        assert_eq!(t.slowdown("crm.lead.list", now), Duration::ZERO);
        t.observe("crm.lead.list", Some(400.0), None);
        assert_eq!(t.slowdown("crm.lead.list", now), Duration::from_secs(3));
        let until = t.pause("CRM.Lead.List", now);
        assert_eq!(until.timestamp(), 1_000_300);
        assert!(t.paused_until("crm.lead.list", now).is_some());
        assert!(
            t.paused_until("user.get", now).is_none(),
            "other methods keep working"
        );
        assert!(t.paused_until("crm.lead.list", until).is_none());
    }

    #[test]
    fn the_bucket_level_drains_at_the_portals_rate_and_survives_its_text() {
        let t0 = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let mut b = BucketLevel { level: 0.0, at: t0 };
        for _ in 0..40 {
            b = b.after_request(t0, 2.0);
        }
        assert_eq!(b.level, 40.0);
        let later = t0 + chrono::Duration::seconds(5);
        assert_eq!(b.drained_to(later, 2.0), 30.0);
        assert_eq!(b.drained_to(t0 + chrono::Duration::minutes(1), 2.0), 0.0);
        assert_eq!(BucketLevel::decode(&b.encode()), Some(b));
        assert_eq!(BucketLevel::decode("garbage"), None);
    }

    #[test]
    fn the_headroom_is_a_seconds_drain_within_a_tenth_of_the_bucket() {
        assert_eq!(headroom(nz(50), nz(2)), 2);
        assert_eq!(headroom(nz(10), nz(10)), 1);
        assert_eq!(headroom(nz(1000), nz(1000)), 100);
        assert_eq!(headroom(nz(5), nz(2)), 1);
    }

    #[test]
    fn a_preloaded_bucket_lets_through_only_what_is_left() {
        let b = RequestBudget::new(nz(50), nz(2), nz(50), Duration::from_secs(1));
        b.preload(40);
        let mut free = 0;
        while b.bucket.check().is_ok() {
            free += 1;
        }
        assert_eq!(free, 8, "48 of headroom-adjusted burst, 40 already used");
    }

    #[test]
    fn a_429_without_a_reset_time_pauses_for_the_documented_ten_minutes() {
        let now = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let t = OperatingTracker::new(480.0);
        let until = t.pause("batch", now);
        assert_eq!(until - now, chrono::Duration::minutes(10));
        // A reset time further than ten minutes away is capped at the window.
        t.observe("batch", Some(500.0), Some(1_000_000 + 3600));
        assert_eq!(t.pause("batch", now) - now, chrono::Duration::minutes(10));
    }
}
