//! The chaos layer: seeded random combinations of every fault class ubsync must survive, over
//! one scenario, then the invariants. Faults: Bitrix24 answers that prove nothing after a commit
//! (HTML 200, truncated bodies, `{"result":[]}`, `{"result":{}}`, a 4xx), 5xx pages, dropped
//! connections, slow answers, 503 and 429, expired tokens; Unitalk errors, capped pages, lying,
//! missing or non-numeric `count`, ignored `offset` and growing totals (for a few passes);
//! ubsync's own clock two days ahead for a pass; the state file deleted between passes; a pass
//! dropped at a random moment (what a kill -9 leaves: committed transactions and requests the
//! portal may have run). Invariants: every eligible call in Bitrix24 exactly once with its
//! recording, one task per missed call, nothing lost (so no cursor moved past unread records).
//!
//! `UBSYNC_CHAOS_SEEDS=200 cargo test --release --test it chaos` runs a longer seeded campaign
//! (default: 3 seeds, about half a minute).

use chrono::Duration;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ubsync::clock::Clock;
use ubsync::sim::unitalk::{CountMode, Paging};
use ubsync::sim::{Fault, FaultKind, UnitalkFault};
use ubsync::sync::PassSummary;

use crate::faults::{assert_exactly_once, converge, roomy, setup};
use crate::harness::pass;

fn bitrix24_fault(rng: &mut StdRng) -> FaultKind {
    let lost = |status: u16, body: &str| FaultKind::CommitThenAnswer {
        status,
        body: body.to_string(),
    };
    match rng.random_range(0..12) {
        0 => FaultKind::Html([500, 502, 504][rng.random_range(0..3)]),
        1 => FaultKind::QueryLimit,
        2 => FaultKind::CommitThenDrop,
        3 => FaultKind::ExpiredToken,
        4 => FaultKind::Slow(std::time::Duration::from_millis(700)),
        5 => FaultKind::OperationLimit,
        6 => lost(200, "<html><body>Bad gateway</body></html>"),
        7 => lost(200, r#"{"result":{"result":{"a0":"#),
        8 => lost(200, r#"{"result":[]}"#),
        9 => lost(200, r#"{"result":{}}"#),
        10 => lost(400, r#"{"error":"ERROR_CORE","error_description":"oops"}"#),
        _ => lost(200, r#"{"result":{"result":{},"result_error":[]}}"#),
    }
}

fn paging(rng: &mut StdRng) -> Paging {
    Paging {
        page_cap: rng.random_bool(0.5).then(|| rng.random_range(3..12)),
        count: match rng.random_range(0..5) {
            0 => CountMode::Missing,
            1 => CountMode::NonNumeric,
            2 => CountMode::Less(rng.random_range(1..20)),
            _ => CountMode::True,
        },
        ignore_offset: false,
    }
}

async fn campaign(seed: u64, mode: &str) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (env, s) = setup(roomy()).await;
    if mode == "activity" {
        env.edit_config(|t| {
            t.replace("mode = \"telephony\"", "mode = \"activity\"")
                + "\n[activity]\ncreate_leads = true\n"
        });
    }
    // Recordings by attachRecord, or in finish on a portal that may silently not download them.
    let on_finish = rng.random_bool(0.5);
    let downloads = rng.random_bool(0.5);
    env.edit_config(|t| {
        t.replacen(
            "[sync]\n",
            &format!("[sync]\nrecord_url_on_finish = {on_finish}\n"),
            1,
        )
    });
    // A portal whose activity listing reads START_TIME without its offset (a lost state file
    // must still duplicate nothing).
    let skewed = rng.random_bool(0.5);
    env.sims.bitrix24.configure(|c| {
        c.finish_record_downloads = downloads;
        c.activity_start_filter_ignores_offset = skewed;
    });
    let state = env.config().state.path;
    let mut ctx = env.ctx().await;
    let mut log = vec![format!(
        "record_url_on_finish = {on_finish}, the portal downloads it: {downloads}, skewed activity listing: {skewed}"
    )];
    let methods = [
        None,
        Some("batch"),
        Some("telephony.externalCall.register"),
        Some("telephony.externalCall.finish"),
        Some("telephony.externalCall.attachRecord"),
        Some("tasks.task.add"),
        Some("tasks.task.list"),
        Some("voximplant.statistic.get"),
        Some("user.get"),
        Some("crm.activity.add"),
        Some("crm.activity.list"),
        Some("crm.duplicate.findbycomm"),
        Some("crm.lead.add"),
    ];
    let mut total = PassSummary::default();
    let mut deleted = false;
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info,it=warn")
        .try_init();
    for round in 0..12 {
        tracing::warn!("CHAOS ROUND {round}");
        for _ in 0..rng.random_range(0..3) {
            let method = methods[rng.random_range(0..methods.len())];
            let kind = bitrix24_fault(&mut rng);
            log.push(format!("{round}: bitrix24 {method:?} {kind:?}"));
            env.sims.bitrix24.inject(Fault::once(method, kind));
        }
        if rng.random_bool(0.3) {
            let f = [
                UnitalkFault::InternalError,
                UnitalkFault::Http(502),
                UnitalkFault::Error("Too many requests".into()),
            ][rng.random_range(0..3)]
            .clone();
            log.push(format!("{round}: unitalk {f:?}"));
            env.sims.unitalk.inject(None, f);
        }
        let mut p = paging(&mut rng);
        // Now and then a server that cannot be paged at all, for one pass.
        match rng.random_range(0..10) {
            0 => p.ignore_offset = true,
            1 => p.count = CountMode::Growing,
            _ => {}
        }
        log.push(format!("{round}: paging {p:?}"));
        env.sims.unitalk.set_paging(p);
        match rng.random_range(0..10) {
            0 if !deleted && round >= 2 => {
                log.push(format!("{round}: state file deleted"));
                drop(ctx);
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", state.display()));
                }
                deleted = true;
                ctx = env.ctx().await;
            }
            1 => {
                log.push(format!("{round}: ubsync's clock two days ahead"));
                let ahead = env
                    .ctx_with_clock(Clock::manual(env.clock.now() + Duration::days(2)))
                    .await;
                let r = pass(&ahead).await;
                log.push(format!("{round}: ahead pass: {r:?}"));
            }
            2 => {
                let after = std::time::Duration::from_millis(rng.random_range(0..150));
                log.push(format!("{round}: killed after {after:?}"));
                if tokio::time::timeout(after, pass(&ctx)).await.is_err() {
                    // A new process: nothing of the killed one survives but the state file.
                    drop(ctx);
                    ctx = env.ctx().await;
                }
            }
            _ => {}
        }
        match pass(&ctx).await {
            Ok(p) => {
                total.pushed += p.pushed;
                total.tasks += p.tasks;
                log.push(format!("{round}: pass ok: {p}"));
            }
            Err(e) => log.push(format!("{round}: pass failed: {e}")),
        }
        log.push(format!(
            "{round}: the portal holds {} registered calls; ledger {:?}",
            env.sims.bitrix24.calls().len(),
            ctx.store.lock().stage_counts().unwrap()
        ));
        env.clock
            .advance(Duration::minutes(rng.random_range(1..30)));
    }
    env.sims.bitrix24.clear_faults();
    env.sims.unitalk.set_paging(Paging::default());
    // What a calm day after the storm must bring: everything, exactly once.
    env.clock.advance(Duration::minutes(40));
    let (rest, last, _) = converge(&env, &ctx, 30).await;
    total.pushed += rest.pushed;
    total.tasks += rest.tasks;
    let (lines, ok) = match mode {
        "activity" => activity_check(&s, &env),
        _ => ubsync::demo::check(&s, &env.sims, &rest, &last),
    };
    assert!(
        ok,
        "{mode} seed {seed}:\n{}\n--- what happened ---\n{}",
        lines.join("\n"),
        log.join("\n")
    );
    if mode != "activity" {
        assert_exactly_once(&s, &env, &rest, &last);
    }
}

/// Activity mode's invariants: one activity per eligible call (by ORIGIN_ID), one task per
/// missed incoming call (by XML_ID), at most one lead per number.
fn activity_check(s: &ubsync::sim::Scenario, env: &crate::harness::TestEnv) -> (Vec<String>, bool) {
    let ops: std::collections::HashSet<&str> =
        s.operators.iter().map(|o| o.inner_line.as_str()).collect();
    let internal = |c: &ubsync::sim::scenario::SimCall| {
        c.direction == "INNER"
            || (ops.contains(c.from.as_str())
                && !c.to.is_empty()
                && c.to.iter().all(|t| ops.contains(t.as_str())))
    };
    let acts = env.sims.bitrix24.activities();
    let tasks = env.sims.bitrix24.tasks();
    let mut problems = Vec::new();
    let pushed: Vec<&ubsync::sim::scenario::SimCall> =
        s.calls.iter().filter(|c| !internal(c)).collect();
    for c in &pushed {
        let ext = format!("unitalk-{}", c.id);
        let n = acts
            .iter()
            .filter(|a| a.origin_id.as_deref() == Some(ext.as_str()))
            .count();
        if n != 1 {
            problems.push(format!("call {}: {n} activities", c.id));
        }
    }
    let (tasks_ok, line) = ubsync::demo::check_tasks(&pushed, &tasks, |_| None);
    if !tasks_ok {
        problems.push(line);
    }
    let mut numbers = std::collections::HashMap::new();
    for l in env.sims.bitrix24.created_leads() {
        *numbers.entry(format!("{:?}", l.phones)).or_insert(0) += 1;
    }
    for (n, k) in numbers {
        if k > 1 {
            problems.push(format!("{k} leads for {n}"));
        }
    }
    let ok = problems.is_empty();
    (problems, ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fault_combinations_never_lose_or_duplicate_a_call() {
    let seeds: u64 = std::env::var("UBSYNC_CHAOS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for seed in 0..seeds {
        campaign(seed, "telephony").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fault_combinations_never_lose_or_duplicate_an_activity_task_or_lead() {
    let seeds: u64 = std::env::var("UBSYNC_CHAOS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for seed in 0..seeds {
        campaign(seed, "activity").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_lost_after_a_429_and_a_lost_probe_answer_re_pushes_nothing() {
    let (env, s) = setup(roomy()).await;
    let state = env.config().state.path;
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    drop(ctx);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", state.display()));
    }
    env.clock.advance(Duration::minutes(10));
    env.sims
        .bitrix24
        .inject(Fault::once(Some("batch"), FaultKind::OperationLimit));
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    assert!(!first.paused.is_empty(), "{first:?}");
    env.clock.advance(Duration::minutes(11));
    env.sims.bitrix24.inject(Fault::once(
        Some("voximplant.statistic.get"),
        FaultKind::CommitThenAnswer {
            status: 200,
            body: r#"{"result":{"result":{"a0":"#.into(),
        },
    ));
    let (rest, last, _) = converge(&env, &ctx, 10).await;
    assert_exactly_once(&s, &env, &rest, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_lost_then_a_pass_with_the_clock_ahead_re_pushes_nothing() {
    let (env, s) = setup(roomy()).await;
    let state = env.config().state.path;
    let ctx = env.ctx().await;
    pass(&ctx).await.unwrap();
    drop(ctx);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", state.display()));
    }
    env.clock.advance(Duration::minutes(10));
    env.sims
        .bitrix24
        .inject(Fault::once(Some("batch"), FaultKind::OperationLimit));
    let ctx = env.ctx().await;
    let first = pass(&ctx).await.unwrap();
    assert!(!first.paused.is_empty(), "{first:?}");
    env.clock.advance(Duration::minutes(3));
    let ahead = env
        .ctx_with_clock(Clock::manual(env.clock.now() + Duration::days(2)))
        .await;
    let p = pass(&ahead).await;
    assert_eq!(env.sims.bitrix24.calls().len(), 38, "{p:?}");
    drop(ahead);
    let (rest, last, _) = converge(&env, &ctx, 10).await;
    assert_exactly_once(&s, &env, &rest, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_answered_without_results_leaves_the_call_in_flight_never_registered_again() {
    let (env, s) = setup(roomy()).await;
    let ctx = env.ctx().await;
    env.sims.bitrix24.inject(Fault::once(
        Some("telephony.externalCall.register"),
        FaultKind::CommitThenDrop,
    ));
    // Every probe of this pass gets an answer that proves nothing.
    env.sims.bitrix24.inject(Fault::times(
        Some("voximplant.statistic.get"),
        FaultKind::CommitThenAnswer {
            status: 200,
            body: r#"{"result":{"result":{},"result_error":[]}}"#.into(),
        },
        4,
    ));
    let first = pass(&ctx).await.unwrap();
    let registered = env.sims.bitrix24.calls().len();
    assert!(
        registered <= 38,
        "{registered} registrations for 38 calls: {first:?}"
    );
    env.clock.advance(Duration::minutes(40));
    let (rest, last, _) = converge(&env, &ctx, 10).await;
    assert_exactly_once(&s, &env, &rest, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_user_or_crm_lookup_never_gives_calls_or_tasks_to_the_wrong_manager() {
    let (env, s) = setup(roomy()).await;
    let ctx = env.ctx().await;
    let nothing = || FaultKind::CommitThenAnswer {
        status: 200,
        body: r#"{"result":{"result":{},"result_error":[]}}"#.into(),
    };
    env.sims
        .bitrix24
        .inject(Fault::times(Some("user.get"), nothing(), 2));
    env.sims.bitrix24.inject(Fault::times(
        Some("telephony.externalCall.searchCrmEntities"),
        nothing(),
        2,
    ));
    let (rest, last, errors) = converge(&env, &ctx, 10).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert!(rest.faults_survived >= 2, "{rest:?}");
    assert_exactly_once(&s, &env, &rest, &last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_answered_with_an_internal_error_or_without_its_id_is_looked_up_not_added_again() {
    for body in [
        // The portal created the task, then reported an internal error for the command.
        r#"{"result":{"result":{},"result_error":{"KEY":{"error":"INTERNAL_SERVER_ERROR","error_description":"Internal error"}}}}"#,
        // ... or answered the command without the task's id.
        r#"{"result":{"result":{"KEY":{"task":{}}},"result_error":[]}}"#,
    ] {
        let mut s = ubsync::sim::Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
        let id = s.add_call(
            chrono::NaiveDateTime::parse_from_str("2026-11-21 10:00:00", "%Y-%m-%d %H:%M:%S")
                .unwrap(),
            "IN",
            "380501112233",
            &["101"],
            "NOANSWER",
            0,
            None,
        );
        let env =
            crate::harness::TestEnv::with(s, roomy(), Clock::manual(crate::harness::t0())).await;
        env.write_config("telephony", "[sync]\nstart = \"2026-11-21\"\n");
        let ctx = env.ctx().await;
        env.sims.bitrix24.inject(Fault::once(
            Some("tasks.task.add"),
            FaultKind::CommitThenAnswer {
                status: 200,
                body: body.replace("KEY", &format!("t_{id}")),
            },
        ));
        let _ = pass(&ctx).await;
        assert_eq!(env.sims.bitrix24.tasks().len(), 1, "committed: {body}");
        for _ in 0..3 {
            env.clock.advance(Duration::minutes(40));
            let _ = pass(&ctx).await;
        }
        assert_eq!(
            env.sims.bitrix24.tasks().len(),
            1,
            "found by the probe, never added again: {body}"
        );
        let row = ctx
            .store
            .lock()
            .ledger_row(&id.to_string())
            .unwrap()
            .unwrap();
        assert!(row.task_id.is_some(), "{row:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_activity_answered_with_an_internal_error_is_looked_up_not_written_again() {
    let mut s = ubsync::sim::Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
    let id = s.add_call(
        chrono::NaiveDateTime::parse_from_str("2026-11-21 10:00:00", "%Y-%m-%d %H:%M:%S").unwrap(),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        40,
        None,
    );
    let env = crate::harness::TestEnv::with(s, roomy(), Clock::manual(crate::harness::t0())).await;
    env.write_config("activity", "[sync]\nstart = \"2026-11-21\"\n");
    let ctx = env.ctx().await;
    env.sims.bitrix24.inject(Fault::once(
        Some("crm.activity.add"),
        FaultKind::CommitThenAnswer {
            status: 200,
            body: format!(
                r#"{{"result":{{"result":{{}},"result_error":{{"v_{id}":{{"error":"INTERNAL_SERVER_ERROR","error_description":"Internal error"}}}}}}}}"#
            ),
        },
    ));
    let _ = pass(&ctx).await;
    assert_eq!(env.sims.bitrix24.activities().len(), 1, "committed");
    for _ in 0..3 {
        env.clock.advance(Duration::minutes(40));
        let _ = pass(&ctx).await;
    }
    assert_eq!(
        env.sims.bitrix24.activities().len(),
        1,
        "never written twice"
    );
    let row = ctx
        .store
        .lock()
        .ledger_row(&id.to_string())
        .unwrap()
        .unwrap();
    assert!(row.b24_activity_id.is_some(), "{row:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_whose_answer_was_lost_is_found_not_created_again() {
    let mut s = ubsync::sim::Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101");
    s.add_call(
        chrono::NaiveDateTime::parse_from_str("2026-11-21 10:00:00", "%Y-%m-%d %H:%M:%S").unwrap(),
        "IN",
        "380679998877",
        &["101"],
        "ANSWER",
        40,
        None,
    );
    let env = crate::harness::TestEnv::with(s, roomy(), Clock::manual(crate::harness::t0())).await;
    env.write_config(
        "activity",
        "[sync]\nstart = \"2026-11-21\"\n[activity]\ncreate_leads = true\n",
    );
    env.edit_config(|t| {
        t.replace(
            "default_user_id = 1\n",
            "default_user_id = 1\nrequest_timeout = \"500ms\"\nretry_base_delay = \"5ms\"\n",
        )
    });
    let ctx = env.ctx().await;
    env.sims
        .bitrix24
        .inject(Fault::once(Some("crm.lead.add"), FaultKind::CommitThenDrop));
    let _ = pass(&ctx).await;
    for _ in 0..3 {
        env.clock.advance(Duration::minutes(40));
        let _ = pass(&ctx).await;
    }
    assert_eq!(
        env.sims.bitrix24.created_leads().len(),
        1,
        "one lead for one number"
    );
    assert_eq!(env.sims.bitrix24.activities().len(), 1);
}
