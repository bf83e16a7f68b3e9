//! Freshness benchmark: how long after a call ends is it finished in Bitrix24, on the shipped
//! one-minute cadence? Calls end "in real time" on a simulated clock: 300 ordinary calls (30 s
//! to 10 min) and 30 long ones (15 to 45 min, longer than `lookback + settle`) start over three
//! hours; one pass runs every simulated minute, and after each pass every call that reached the
//! simulated portal gets its lag (pass time − call end). Deterministic (seeded, manual clock);
//! takes a few seconds.
//!
//! Run: `cargo bench --bench freshness`. Prints p50/p95/max for ordinary and long calls, and the
//! targets: ordinary ≤ settle + 90 s, long ≤ settle + sweep_every + 90 s.

use chrono::{Duration, NaiveDate, TimeZone, Utc};
use rand::{rngs::StdRng, Rng, SeedableRng};
use ubsync::clock::Clock;
use ubsync::sim::bitrix24::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_WEBHOOK_CODE};
use ubsync::sim::unitalk::DEFAULT_API_KEY;
use ubsync::sim::{Bitrix24SimConfig, Scenario, Simulators};

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
    let mut rng = StdRng::seed_from_u64(7);
    let mut s = Scenario::empty(tz)
        .with_operator(10, "101")
        .with_operator(11, "102");
    let mut calls = Vec::new(); // (id, end, long)
    for i in 0..330 {
        let long = i % 11 == 0;
        let start = first + Duration::seconds(rng.random_range(0..3 * 3600));
        let talk: u32 = if long {
            rng.random_range(15 * 60..45 * 60)
        } else {
            rng.random_range(30..600)
        };
        let id = s.add_call(start, "IN", "380501112233", &["101"], "ANSWER", talk, None);
        let c = s.calls.last().unwrap();
        let end = tz.from_local_datetime(&c.date).unwrap().with_timezone(&Utc)
            + Duration::seconds(c.seconds_full as i64);
        calls.push((id, end, long));
    }
    let t0 = tz.from_local_datetime(&first).unwrap().with_timezone(&Utc);
    let clock = Clock::manual(t0);
    let cfg = Bitrix24SimConfig {
        burst: 10_000.0,
        ..Default::default()
    };
    let any = "127.0.0.1:0".parse().unwrap();
    let sims = Simulators::start(&s, cfg, clock.clone(), any, any)
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
             client_secret = \"{DEFAULT_CLIENT_SECRET}\"\noauth_url = \"{b24}\"\nwebhook_url = \"{b24}/rest/1/{DEFAULT_WEBHOOK_CODE}/\"\n\
             default_user_id = 1\nburst = 10000\nper_second = 1000\nmax_per_10s = 100000\n\
             [sync]\nstart = \"{}\"\n",
            sims.unitalk_url(),
            first - Duration::hours(1),
        ),
    )
    .unwrap();
    let config = ubsync::config::Config::load(&path, &ubsync::config::Env::default()).unwrap();
    let (settle, sweep) = (config.sync.settle, config.sync.sweep_every);
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
    let mut lag: std::collections::HashMap<u64, i64> = Default::default();
    let last_end = calls.iter().map(|c| c.1).max().unwrap();
    while clock.now() < last_end + Duration::hours(1) {
        clock.advance(Duration::minutes(1));
        ubsync::sync::run_pass(&ctx, &Default::default())
            .await
            .unwrap();
        let now = clock.now();
        let seen: std::collections::HashSet<String> = sims
            .bitrix24
            .stats()
            .into_iter()
            .filter_map(|r| r.external_call_id)
            .collect();
        for (id, end, _) in &calls {
            if !lag.contains_key(id) && seen.contains(&format!("unitalk-{id}")) {
                lag.insert(*id, (now - *end).num_seconds());
            }
        }
    }
    let report = |long: bool| {
        let mut v: Vec<i64> = calls
            .iter()
            .filter(|c| c.2 == long)
            .filter_map(|c| lag.get(&c.0).copied())
            .collect();
        let total = calls.iter().filter(|c| c.2 == long).count();
        let delivered = v.len();
        let (p50, p95) = (percentile(&mut v, 0.5), percentile(&mut v, 0.95));
        let max = v.iter().max().copied().unwrap_or(0);
        (total, delivered, p50, p95, max)
    };
    let (ot, od, o50, o95, omax) = report(false);
    let (lt, ld, l50, l95, lmax) = report(true);
    let settle = settle.as_secs() as i64;
    let sweep = sweep.as_secs() as i64;
    println!("ubsync freshness benchmark (call end -> finished in Bitrix24, one pass a minute)");
    println!("  ordinary calls  {od}/{ot} delivered, p50 {o50} s, p95 {o95} s, max {omax} s (target p95 <= settle + 90 s = {} s)", settle + 90);
    println!("  long calls      {ld}/{lt} delivered, p50 {l50} s, p95 {l95} s, max {lmax} s (target p95 <= settle + sweep_every + 90 s = {} s)", settle + sweep + 90);
}
