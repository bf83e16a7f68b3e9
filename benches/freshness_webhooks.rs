//! Freshness with Unitalk webhooks on: call end → finished in Bitrix24 when each call's
//! `CALL_END` reaches the inbox as it ends and the daemon's events pass runs on it (the daemon
//! checks the inbox every second; here one tick is 2 simulated seconds). 300 calls over three
//! hours on a manual clock; deterministic; a few seconds.
//!
//! Run: `cargo bench --bench freshness_webhooks`. Prints p50/p95/max (target p95 <= 10 s).

use chrono::{Duration, NaiveDate, TimeZone, Utc};
use rand::{rngs::StdRng, Rng, SeedableRng};
use ubsync::clock::Clock;
use ubsync::sim::bitrix24::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET};
use ubsync::sim::unitalk::DEFAULT_API_KEY;
use ubsync::sim::{Bitrix24SimConfig, Scenario, Simulators};
use ubsync::sync::PassOptions;

fn percentile(v: &mut [i64], p: f64) -> i64 {
    v.sort();
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tz = chrono_tz::Europe::Kyiv;
    let day = NaiveDate::from_ymd_opt(2026, 11, 23).unwrap();
    let first = day.and_hms_opt(9, 0, 0).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut s = Scenario::empty(tz)
        .with_operator(10, "101")
        .with_operator(11, "102");
    for _ in 0..300 {
        let start = first + Duration::seconds(rng.random_range(0..3 * 3600));
        let talk: u32 = rng.random_range(20..600);
        let answered = rng.random_bool(0.7);
        s.add_call(
            start,
            "IN",
            &format!("38050{:07}", rng.random_range(0..10_000_000u32)),
            &["101"],
            if answered { "ANSWER" } else { "NOANSWER" },
            if answered { talk } else { 0 },
            None,
        );
    }
    let mut ends: Vec<(u64, chrono::DateTime<Utc>)> = s
        .calls
        .iter()
        .map(|c| {
            (
                c.id,
                tz.from_local_datetime(&c.date).unwrap().with_timezone(&Utc)
                    + Duration::seconds(c.seconds_full as i64),
            )
        })
        .collect();
    ends.sort_by_key(|e| e.1);
    let t0 = tz.from_local_datetime(&first).unwrap().with_timezone(&Utc);
    let clock = Clock::manual(t0);
    let any = "127.0.0.1:0".parse().unwrap();
    let sims = Simulators::start(&s, Bitrix24SimConfig::default(), clock.clone(), any, any)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b24 = sims.bitrix24_url();
    let path = dir.path().join("ubsync.toml");
    std::fs::write(
        &path,
        format!(
            "[unitalk]\nbase_url = \"{}\"\napi_key = \"{DEFAULT_API_KEY}\"\n\
             [bitrix24]\nmode = \"telephony\"\nportal_url = \"{b24}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\n\
             client_secret = \"{DEFAULT_CLIENT_SECRET}\"\noauth_url = \"{b24}\"\ndefault_user_id = 1\n\
             [sync]\nstart = \"{}\"\n[webhooks]\nunitalk_secret = \"bench-secret-bench-secret-bench\"\n",
            sims.unitalk_url(),
            first - Duration::hours(1),
        ),
    )
    .unwrap();
    let config = ubsync::config::Config::load(&path, &ubsync::config::Env::default()).unwrap();
    let store =
        ubsync::store::SharedStore::new(ubsync::store::Store::open(&config.state.path).unwrap());
    let b24c =
        ubsync::bitrix24::Bitrix24Client::new(&config.bitrix24, store.clone(), clock.clone())
            .unwrap();
    let (_, refresh) = sims.bitrix24.install_app(1);
    b24c.exchange(&refresh).await.unwrap();
    let ctx = ubsync::sync::SyncCtx {
        recordings: ubsync::recording::client(&config),
        unitalk: ubsync::unitalk::UnitalkClient::new(&config.unitalk).unwrap(),
        b24: b24c,
        cfg: config,
        store,
        clock: clock.clone(),
        cancel: tokio_util::sync::CancellationToken::new(),
    };
    let events = PassOptions {
        events_only: true,
        ..PassOptions::default()
    };
    let by_id: std::collections::HashMap<u64, _> = s.calls.iter().map(|c| (c.id, c)).collect();
    let mut next = 0;
    let mut lag = Vec::new();
    let mut pending: Vec<(u64, chrono::DateTime<Utc>)> = Vec::new();
    let last = ends.last().unwrap().1;
    while clock.now() <= last + Duration::minutes(1) {
        clock.advance(Duration::seconds(2));
        let now = clock.now();
        // Every call that ended by now has its CALL_END in the inbox (as the route stores it).
        while next < ends.len() && ends[next].1 <= now {
            let (id, end) = ends[next];
            let body = ubsync::sim::unitalk_webhooks::end_event(by_id[&id], 0).to_string();
            ctx.store
                .lock()
                .inbox_add("unitalk", &body, Some("application/json"), now)
                .unwrap();
            pending.push((id, end));
            next += 1;
        }
        if ctx.store.lock().inbox_waiting().unwrap() == 0 && pending.is_empty() {
            continue;
        }
        ubsync::sync::run_pass(&ctx, &events).await.unwrap();
        let done = clock.now();
        let seen: std::collections::HashSet<String> = sims
            .bitrix24
            .stats()
            .into_iter()
            .filter_map(|r| r.external_call_id)
            .collect();
        pending.retain(|(id, end)| {
            if seen.contains(&format!("unitalk-{id}")) {
                lag.push((done - *end).num_seconds());
                false
            } else {
                true
            }
        });
    }
    let delivered = lag.len();
    let (p50, p95) = (percentile(&mut lag, 0.5), percentile(&mut lag, 0.95));
    let max = lag.iter().max().copied().unwrap_or(0);
    println!("ubsync freshness with Unitalk webhooks (call end -> finished in Bitrix24, inbox checked every 2 s)");
    println!(
        "  {delivered}/{} calls, p50 {p50} s, p95 {p95} s, max {max} s (target p95 <= 10 s)",
        ends.len()
    );
}
