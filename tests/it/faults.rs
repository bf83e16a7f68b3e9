//! The fault matrix: the same seeded day pushed through the Bitrix24 simulator with each fault
//! injected, and with all of them at once at random. Every run must end with the portal holding
//! each call exactly once, each recording, and each missed-call task exactly once.

use std::collections::HashMap;

use chrono::{Duration, NaiveDate};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ubsync::sim::scenario::Scenario;
use ubsync::sim::{BatchBilling, Bitrix24SimConfig, Fault, FaultKind};
use ubsync::sync::{PassSummary, SyncCtx};

use crate::harness::{pass, TestEnv};

const KYIV: chrono_tz::Tz = chrono_tz::Europe::Kyiv;

pub(crate) fn scenario() -> Scenario {
    Scenario::call_centre_day(
        KYIV,
        NaiveDate::from_ymd_opt(2026, 11, 21).unwrap(),
        6,
        40,
        11,
    )
}

/// A portal with room for every request of a pass under the frozen clock; faults do the rest.
pub(crate) fn roomy() -> Bitrix24SimConfig {
    Bitrix24SimConfig {
        burst: 1000.0,
        ..Default::default()
    }
}

const FAST_RETRIES: &str = "[sync]\nstart = \"2026-11-21\"\n";

pub(crate) async fn setup(cfg: Bitrix24SimConfig) -> (TestEnv, Scenario) {
    let s = scenario();
    let env = TestEnv::with(
        s.clone(),
        cfg,
        ubsync::clock::Clock::manual(crate::harness::t0()),
    )
    .await;
    env.write_config("telephony", FAST_RETRIES);
    env.edit_config(|t| {
        t.replace("default_user_id = 1\n", "default_user_id = 1\nretry_base_delay = \"5ms\"\nrequest_timeout = \"500ms\"\nmax_per_10s = 100000\nburst = 10000\nper_second = 1000\n")
            .replace("timezone = \"Europe/Kyiv\"\n", "timezone = \"Europe/Kyiv\"\nretry_base_delay = \"5ms\"\n")
    });
    (env, s)
}

/// Runs passes, moving the clock on between them (so backoffs and 429 pauses expire), until a
/// pass succeeds without sending anything. Returns the sum of the working passes and the last.
pub(crate) async fn converge(
    env: &TestEnv,
    ctx: &SyncCtx,
    max_passes: usize,
) -> (PassSummary, PassSummary, Vec<String>) {
    let mut total = PassSummary::default();
    let mut errors = Vec::new();
    for _ in 0..max_passes {
        match pass(ctx).await {
            Ok(s) if s.bitrix24_requests == 0 && s.pulled == 0 && !total.windows.eq(&0) => {
                return (total, s, errors)
            }
            Ok(s) => {
                total.pushed += s.pushed;
                total.tasks += s.tasks;
                total.quarantined += s.quarantined;
                total.probed += s.probed;
                total.faults_survived += s.faults_survived;
                total.windows += s.windows.max(1);
                total.refreshes += s.refreshes;
                total.rate_limited += s.rate_limited;
                total.operation_limited += s.operation_limited;
                total.paused.extend(s.paused);
            }
            Err(e) => errors.push(e.to_string()),
        }
        env.clock.advance(Duration::minutes(40));
    }
    panic!("did not converge in {max_passes} passes; errors: {errors:#?}");
}

pub(crate) fn assert_exactly_once(
    s: &Scenario,
    env: &TestEnv,
    total: &PassSummary,
    last: &PassSummary,
) {
    let (lines, ok) = ubsync::demo::check(s, &env.sims, total, last);
    assert!(ok, "{}", lines.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_is_waited_out_and_slows_the_client_down() {
    let (env, s) = setup(roomy()).await;
    let ctx = env.ctx().await;
    env.sims
        .bitrix24
        .inject(Fault::times(None, FaultKind::QueryLimit, 12));
    let (total, last, errors) = converge(&env, &ctx, 4).await;
    assert!(
        errors.is_empty(),
        "a 503 storm never fails a pass: {errors:?}"
    );
    assert_eq!(total.rate_limited, 12);
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_one_method_pauses_it_while_the_rest_goes_on() {
    // Portals that bill nested commands to their own methods.
    let cfg = Bitrix24SimConfig {
        method_costs: HashMap::from([("tasks.task.add".to_string(), 200.0)]),
        batch_billing: BatchBilling::PerMethod,
        ..roomy()
    };
    let (env, s) = setup(cfg).await;
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    assert!(
        first.operation_limited > 0 && !first.paused.is_empty(),
        "{first:?}"
    );
    assert!(
        first.paused[0].starts_with("tasks.task.add until"),
        "{:?}",
        first.paused
    );
    assert_eq!(
        env.sims.bitrix24.stats().len() as u64,
        first.pushed,
        "calls kept going while tasks were paused"
    );
    let (mut total, last, _) = converge(&env, &ctx, 6).await;
    total.pushed += first.pushed;
    total.tasks += first.tasks;
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_its_operating_budget_pauses_every_push_until_the_reset_without_duplicates() {
    // Real portals bill a whole batch to `batch`: 5 s a command, so the third full batch
    // crosses the 480 s budget and the next one is refused with 429.
    let cfg = Bitrix24SimConfig {
        default_cost: 5.0,
        ..roomy()
    };
    let (env, s) = setup(cfg).await;
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    assert!(
        first.paused.iter().any(|p| p.starts_with("batch until")),
        "{first:?}"
    );
    let refused = |env: &TestEnv| {
        env.sims
            .bitrix24
            .requests()
            .iter()
            .filter(|r| r.status == 429)
            .count()
    };
    assert_eq!(
        refused(&env),
        1,
        "one 429, then nothing is sent until the reset"
    );
    let batches = env.sims.bitrix24.requests().len();
    env.clock.advance(Duration::minutes(11));
    let (mut total, last, errors) = converge(&env, &ctx, 12).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(env.sims.bitrix24.requests().len() > batches);
    total.pushed += first.pushed;
    total.tasks += first.tasks;
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn html_5xx_pages_are_probed_and_retried() {
    let (env, s) = setup(roomy()).await;
    let ctx = env.ctx().await;
    env.sims
        .bitrix24
        .inject(Fault::times(Some("batch"), FaultKind::Html(502), 3));
    let (total, last, errors) = converge(&env, &ctx, 8).await;
    assert!(
        errors.is_empty(),
        "the pass survives three failed batches: {errors:?}"
    );
    assert_eq!(total.faults_survived, 3, "{total:?}");
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_that_stays_down_ends_the_pass_after_the_configured_failures_in_a_row() {
    let (env, s) = setup(roomy()).await;
    env.edit_config(|t| t.replace("[sync]\n", "[sync]\nmax_consecutive_failures = 2\n"));
    let ctx = env.ctx().await;
    env.sims
        .bitrix24
        .inject(Fault::times(Some("batch"), FaultKind::Html(500), 1000));
    let err = pass(&ctx).await.unwrap_err();
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    let batches = env
        .sims
        .bitrix24
        .requests()
        .iter()
        .filter(|r| r.method == "batch")
        .count();
    // Bounded: each read (the verify listing, the user lookup) is asked at most 4 times, and
    // the third failed write in a row ends the pass.
    assert!(
        (3..=12).contains(&batches),
        "the pass ends after a bounded number of failed requests: {batches}"
    );
    env.sims.bitrix24.clear_faults();
    env.clock.advance(Duration::minutes(40));
    let (total, last, errors) = converge(&env, &ctx, 8).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_followed_by_dropped_connections_never_duplicate() {
    let (env, s) = setup(roomy()).await;
    let ctx = env.ctx().await;
    env.sims.bitrix24.inject(Fault::once(
        Some("telephony.externalCall.finish"),
        FaultKind::CommitThenDrop,
    ));
    env.sims.bitrix24.inject(Fault::once(
        Some("tasks.task.add"),
        FaultKind::CommitThenDrop,
    ));
    let (total, last, errors) = converge(&env, &ctx, 8).await;
    assert!(
        errors.is_empty(),
        "lost answers are probed inside the pass: {errors:?}"
    );
    assert_eq!(total.faults_survived, 2, "{total:?}");
    assert!(total.probed > 0);
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_slower_than_the_client_timeout_are_probed_not_resent() {
    let (env, s) = setup(roomy()).await;
    let ctx = env.ctx().await;
    env.sims.bitrix24.inject(Fault::once(
        Some("telephony.externalCall.register"),
        FaultKind::Slow(std::time::Duration::from_millis(900)),
    ));
    let (total, last, errors) = converge(&env, &ctx, 8).await;
    assert!(
        errors.is_empty(),
        "a timed-out batch is probed inside the pass: {errors:?}"
    );
    assert_eq!(total.faults_survived, 1, "{total:?}");
    assert!(total.probed > 0);
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_pass_is_refreshed_once_and_the_rotated_refresh_token_is_kept() {
    let (env, s) = setup(roomy()).await;
    let ctx = env.ctx().await;
    let key = env.b24().trim_start_matches("http://").to_string();
    let before = ctx.store.lock().tokens(&key).unwrap().unwrap();
    env.sims
        .bitrix24
        .inject(Fault::once(Some("tasks.task.add"), FaultKind::ExpiredToken));
    let (total, last, errors) = converge(&env, &ctx, 4).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(total.refreshes, 1);
    let after = ctx.store.lock().tokens(&key).unwrap().unwrap();
    assert_ne!(
        after.refresh_token, before.refresh_token,
        "the rotated refresh token is stored"
    );
    assert!(env.sims.bitrix24.refresh_token_valid(&after.refresh_token));
    assert!(!env.sims.bitrix24.refresh_token_valid(&before.refresh_token));
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_that_moved_answers_302_and_ubsync_follows_and_remembers() {
    for mode in ["telephony", "activity"] {
        let (env, s) = setup(roomy()).await;
        let old = ubsync::sim::serve(
            "127.0.0.1:0".parse().unwrap(),
            env.sims.bitrix24.moved_router(&env.b24()),
        )
        .await
        .unwrap();
        let old_base = old.base_url();
        // The configured addresses are the portal's old ones.
        env.edit_config(|t| {
            t.replace(
                &format!("mode = \"telephony\"\nportal_url = \"{}\"", env.b24()),
                &format!("mode = \"{mode}\"\nportal_url = \"{old_base}\""),
            )
            .replace(
                &format!("webhook_url = \"{}/", env.b24()),
                &format!("webhook_url = \"{old_base}/"),
            )
        });
        let ctx = env.ctx().await;
        let (total, last, errors) = converge(&env, &ctx, 4).await;
        assert!(errors.is_empty(), "{mode}: {errors:?}");
        let redirected = env
            .sims
            .bitrix24
            .requests()
            .iter()
            .filter(|r| r.status == 302)
            .count();
        assert_eq!(
            redirected, 1,
            "{mode}: one 302, then the new address is used directly"
        );
        // What is remembered is an origin only: never the webhook code.
        let facts: Vec<String> = ctx
            .store
            .lock()
            .conn()
            .prepare("SELECT key || ' ' || value FROM portal_facts WHERE key LIKE '%moved%'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            facts,
            vec![format!("bitrix24.moved:{old_base} {}", env.b24())],
            "{mode}"
        );
        if mode == "telephony" {
            assert_exactly_once(&s, &env, &total, &last);
        } else {
            assert!(
                env.sims.bitrix24.activities().len() as u64 >= total.pushed && total.pushed > 0
            );
        }
        {
            // A new client (a later run) goes straight to the new address.
            let ctx2 = env.ctx().await;
            let before = env.sims.bitrix24.requests().len();
            ctx2.b24
                .call("user.current", serde_json::Value::Null)
                .await
                .unwrap();
            assert_eq!(
                env.sims.bitrix24.requests()[before..]
                    .iter()
                    .filter(|r| r.status == 302)
                    .count(),
                0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_refusing_attach_record_in_a_batch_gets_standalone_requests() {
    let cfg = Bitrix24SimConfig {
        attach_record_in_batch: false,
        ..roomy()
    };
    let (env, s) = setup(cfg).await;
    env.edit_config(|t| t.replacen("[sync]\n", "[sync]\nrecord_url_on_finish = false\n", 1));
    let ctx = env.ctx().await;
    let (total, last, errors) = converge(&env, &ctx, 4).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        ctx.store
            .lock()
            .fact("bitrix24.attach_record_in_batch")
            .unwrap()
            .as_deref(),
        Some("no")
    );
    let refused = env
        .sims
        .bitrix24
        .requests()
        .iter()
        .filter(|r| r.method == "batch" && r.commands.iter().any(|c| c.ends_with("attachrecord")))
        .count();
    assert_eq!(
        refused, 1,
        "after the first refusal, recordings never go into a batch again"
    );
    assert!(env
        .sims
        .bitrix24
        .requests()
        .iter()
        .any(|r| r.method == "telephony.externalcall.attachrecord" && r.status == 200));
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_faults_at_once_at_random_still_end_exactly_once() {
    for seed in [1u64, 2, 3] {
        let mut rng = StdRng::seed_from_u64(seed);
        let cfg = Bitrix24SimConfig {
            attach_record_in_batch: rng.random_bool(0.5),
            method_costs: HashMap::from([("tasks.task.add".to_string(), 150.0)]),
            token_ttl: Duration::minutes(50),
            ..roomy()
        };
        let (env, s) = setup(cfg).await;
        let old = ubsync::sim::serve(
            "127.0.0.1:0".parse().unwrap(),
            env.sims.bitrix24.moved_router(&env.b24()),
        )
        .await
        .unwrap();
        // The configured address is the portal's old one: it answers 302 to the new one.
        let old_base = old.base_url();
        env.edit_config(|t| {
            t.replace(
                &format!("portal_url = \"{}\"", env.b24()),
                &format!("portal_url = \"{old_base}\""),
            )
        });
        let ctx = env.ctx().await;
        let methods = [
            None,
            Some("batch"),
            Some("telephony.externalCall.register"),
            Some("telephony.externalCall.finish"),
            Some("tasks.task.add"),
            Some("voximplant.statistic.get"),
            Some("user.get"),
            Some("telephony.externalCall.searchCrmEntities"),
        ];
        for _ in 0..10 {
            let method = methods[rng.random_range(0..methods.len())];
            let kind = match rng.random_range(0..6) {
                0 => FaultKind::Html([500, 502, 504][rng.random_range(0..3)]),
                1 => FaultKind::QueryLimit,
                2 => FaultKind::CommitThenDrop,
                3 => FaultKind::ExpiredToken,
                4 => FaultKind::Slow(std::time::Duration::from_millis(700)),
                _ => FaultKind::OperationLimit,
            };
            env.sims
                .bitrix24
                .inject(Fault::times(method, kind, rng.random_range(1..3)));
        }
        let (total, last, _errors) = converge(&env, &ctx, 25).await;
        assert_exactly_once(&s, &env, &total, &last);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_client_on_the_same_bucket_makes_ubsync_slow_down_but_lose_nothing() {
    // Real time, scaled up: a bucket of 10 draining 10/s, shared with a client that takes 6/s.
    // Same dynamics as 50 and 2/s, in seconds rather than minutes.
    let clock = ubsync::clock::Clock::system();
    let day = (clock.now().with_timezone(&KYIV) - Duration::days(1)).date_naive();
    let s = Scenario::call_centre_day(KYIV, day, 6, 150, 13);
    let cfg = Bitrix24SimConfig {
        burst: 10.0,
        drain_per_sec: 10.0,
        ..Default::default()
    };
    let env = TestEnv::with(s.clone(), cfg, clock).await;
    env.write_config("telephony", &format!("[sync]\nstart = \"{day}\"\n"));
    env.edit_config(|t| {
        t.replace(
            "default_user_id = 1\n",
            "default_user_id = 1\nburst = 10\nper_second = 10\nretry_base_delay = \"50ms\"\n",
        )
    });
    let ctx = env.ctx().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let competitor = {
        let stop = stop.clone();
        let http = env.http.clone();
        let url = format!("{}user.current", env.webhook());
        tokio::spawn(async move {
            let (mut ok, mut attempts) = (0u32, 0u32);
            // At least two seconds of load, however quickly ubsync's passes finish.
            while !stop.is_cancelled() || attempts < 12 {
                attempts += 1;
                if http
                    .post(&url)
                    .json(&serde_json::json!({}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
                {
                    ok += 1;
                }
                tokio::time::sleep(std::time::Duration::from_millis(166)).await;
            }
            ok
        })
    };
    env.sims.bitrix24.set_bucket_level(10.0);
    let (total, last, errors) = converge(&env, &ctx, 4).await;
    stop.cancel();
    let competitor_ok = competitor.await.unwrap();
    assert!(
        errors.is_empty(),
        "sharing the bucket never fails a pass: {errors:?}"
    );
    assert!(
        total.rate_limited > 0,
        "ubsync met the other client's load: {total:?}"
    );
    assert!(
        competitor_ok > 0,
        "the other client kept working ({competitor_ok} requests)"
    );
    assert_exactly_once(&s, &env, &total, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_meeting_an_expired_token_refresh_it_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let (env, _) = setup(roomy()).await;
    let ctx = env.ctx().await;
    let before = ctx.b24.stats.refreshes.load(Relaxed);
    env.sims.bitrix24.expire_access_tokens();
    let call = || ctx.b24.call("user.current", serde_json::Value::Null);
    let results = tokio::join!(call(), call(), call(), call(), call(), call());
    let all = [
        results.0, results.1, results.2, results.3, results.4, results.5,
    ];
    assert!(all.iter().all(|r| r.is_ok()), "{all:?}");
    assert_eq!(
        ctx.b24.stats.refreshes.load(Relaxed) - before,
        1,
        "single flight"
    );
}
