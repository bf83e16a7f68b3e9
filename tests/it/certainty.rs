//! Outcome certainty: a write counts as "not executed" only with proof. Every answer that proves
//! nothing about a committed batch (HTML, a truncated body, a 4xx, empty results, results missing
//! the command's key) must end with each call in Bitrix24 exactly once, in both modes.

use std::collections::HashMap;

use chrono::{Duration, NaiveDate};
use ubsync::sim::scenario::Scenario;
use ubsync::sim::{Bitrix24SimConfig, Fault, FaultKind};

use crate::harness::{pass, t0, TestEnv};

const KYIV: chrono_tz::Tz = chrono_tz::Europe::Kyiv;

fn scenario() -> Scenario {
    Scenario::call_centre_day(
        KYIV,
        NaiveDate::from_ymd_opt(2026, 11, 21).unwrap(),
        4,
        20,
        5,
    )
}

/// Bitrix24 holds no call twice: registrations and statistics per EXTERNAL_CALL_ID, activities
/// per ORIGIN_ID, tasks per call.
pub fn assert_no_duplicates(env: &TestEnv, what: &str) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in env.sims.bitrix24.calls() {
        *seen
            .entry(format!("register {:?}", c.external_call_id))
            .or_default() += 1;
    }
    for r in env.sims.bitrix24.stats() {
        *seen
            .entry(format!("stat {:?}", r.external_call_id))
            .or_default() += 1;
    }
    for a in env.sims.bitrix24.activities() {
        if a.originator_id.as_deref() == Some("ubsync") {
            *seen
                .entry(format!("activity {:?}", a.origin_id))
                .or_default() += 1;
        }
    }
    for t in env.sims.bitrix24.tasks() {
        *seen.entry(format!("task {:?}", t.xml_id)).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "{what}: duplicated in Bitrix24: {dups:?}");
}

/// Runs passes (moving the clock on) until one sends nothing; returns how many calls and tasks
/// Bitrix24 holds.
async fn settle(env: &TestEnv, ctx: &ubsync::sync::SyncCtx) {
    for _ in 0..8 {
        let before = env.sims.bitrix24.requests().len();
        let r = pass(ctx).await;
        env.clock.advance(Duration::minutes(10));
        if r.is_ok() && env.sims.bitrix24.requests().len() == before {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_without_per_command_results_after_a_commit_never_cause_a_second_write() {
    let answers: Vec<(&str, u16, String)> = vec![
        ("HTML 200", 200, "<html><body>Bitrix24 is updating</body></html>".into()),
        ("truncated", 200, "{\"result\":{\"result\":{\"r_1".into()),
        ("empty list", 200, "{\"result\":[]}".into()),
        ("empty map", 200, "{\"result\":{}}".into()),
        (
            "no keys",
            200,
            "{\"result\":{\"result\":{},\"result_error\":[],\"result_total\":[],\"result_next\":[],\"result_time\":[]},\"time\":{}}"
                .into(),
        ),
        ("400 unknown", 400, "{\"error\":\"SOMETHING_ODD\",\"error_description\":\"?\"}".into()),
        ("404 HTML", 404, "<html>Not Found</html>".into()),
    ];
    for mode in ["telephony", "activity"] {
        for (what, status, body) in &answers {
            let s = scenario();
            let cfg = Bitrix24SimConfig {
                burst: 1000.0,
                ..Default::default()
            };
            let env = TestEnv::with(s, cfg, ubsync::clock::Clock::manual(t0())).await;
            env.write_config(mode, "[sync]\nstart = \"2026-11-21\"\n");
            let ctx = env.ctx().await;
            // Every write batch of the first pass commits, then answers with `body`.
            env.sims.bitrix24.inject(Fault::times(
                Some("batch"),
                FaultKind::CommitThenAnswer {
                    status: *status,
                    body: body.clone(),
                },
                3,
            ));
            settle(&env, &ctx).await;
            let label = format!("{mode}, {what}");
            assert_no_duplicates(&env, &label);
            let rows = ctx.store.lock().ledger_rows().unwrap();
            let stuck: Vec<_> = rows
                .iter()
                .filter(|l| !matches!(l.stage.as_str(), "done" | "skipped"))
                .collect();
            assert!(stuck.is_empty(), "{label}: not finished: {stuck:?}");
            let pushed = rows.iter().filter(|l| l.stage.as_str() == "done").count();
            let held = match mode {
                "telephony" => env.sims.bitrix24.stats().len(),
                _ => env
                    .sims
                    .bitrix24
                    .activities()
                    .iter()
                    .filter(|a| a.originator_id.as_deref() == Some("ubsync"))
                    .count(),
            };
            assert_eq!(held, pushed, "{label}: every call in Bitrix24 once");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_empty_state_file_over_a_synced_portal_duplicates_nothing() {
    // `skewed`: the portal reads a listing's START_TIME filter without its offset, so the
    // listing by date misses calls it holds (activity mode must not take that as absence).
    for (mode, how, skewed) in [
        ("telephony", "deleted", false),
        ("telephony", "emptied", false),
        ("activity", "deleted", false),
        ("activity", "emptied", false),
        ("activity", "emptied", true),
    ] {
        let cfg = Bitrix24SimConfig {
            burst: 1000.0,
            activity_start_filter_ignores_offset: skewed,
            ..Default::default()
        };
        let env = TestEnv::with(scenario(), cfg, ubsync::clock::Clock::manual(t0())).await;
        env.write_config(mode, "[sync]\nstart = \"2026-11-21\"\n");
        {
            let ctx = env.ctx().await;
            settle(&env, &ctx).await;
        }
        let label = format!("{mode}, state file {how}, skewed listing {skewed}");
        let (calls, stats, acts, tasks) = (
            env.sims.bitrix24.calls().len(),
            env.sims.bitrix24.stats().len(),
            env.sims.bitrix24.activities().len(),
            env.sims.bitrix24.tasks().len(),
        );
        assert!(
            stats + acts > 0 && tasks > 0,
            "{label}: the first store pushed"
        );
        let db = env.dir.path().join("state/ubsync.db");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        if how == "emptied" {
            std::fs::write(&db, b"").unwrap();
        }
        // Well past Bitrix24's 30-minute registration dedupe.
        env.clock.advance(Duration::hours(3));
        let ctx = env.ctx().await;
        let before = env.sims.bitrix24.requests().len();
        settle(&env, &ctx).await;
        assert_no_duplicates(&env, &label);
        // Each call continues from the listing by date: no lookup per call (only a missed
        // call's task is looked up). A skewed listing costs a probe per call it missed, 50 a
        // request.
        let requests = &env.sims.bitrix24.requests()[before..];
        let lookups = requests
            .iter()
            .flat_map(|r| r.commands.clone())
            .filter(|c| c == "voximplant.statistic.get" || c == "crm.activity.list")
            .count();
        if skewed {
            assert!(
                requests.len() <= 2 * (stats + acts) / 50 + 6,
                "{label}: {} requests for {} calls",
                requests.len(),
                stats + acts
            );
        } else {
            assert!(
                lookups <= 2 * (stats + acts) / 50 + 4,
                "{label}: {lookups} lookups for {} calls",
                stats + acts
            );
        }
        assert_eq!(
            (
                env.sims.bitrix24.calls().len(),
                env.sims.bitrix24.stats().len(),
                env.sims.bitrix24.activities().len(),
                env.sims.bitrix24.tasks().len()
            ),
            (calls, stats, acts, tasks),
            "{label}: nothing written twice"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_state_file_stops_with_what_to_do() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "");
    let db = env.dir.path().join("state/ubsync.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    std::fs::write(&db, vec![0x42u8; 8192]).unwrap();
    let out = env.ubsync(&["sync"]).await;
    let t = crate::harness::text(&out);
    assert_ne!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("Restore it from a backup")
            && t.contains("move it aside")
            && t.contains("OAuth tokens")
            && t.contains("set-refresh-token")
            && t.contains("verify-first"),
        "{t}"
    );
    assert!(env.sims.bitrix24.activities().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_first_lists_the_range_once_and_probes_only_the_calls_bitrix24_holds() {
    for mode in ["telephony", "activity"] {
        let cfg = Bitrix24SimConfig {
            burst: 1000.0,
            ..Default::default()
        };
        let env = TestEnv::with(scenario(), cfg, ubsync::clock::Clock::manual(t0())).await;
        env.write_config(mode, "[sync]\nstart = \"2026-11-21\"\n");
        let ctx = env.ctx().await;
        let first = pass(&ctx).await.unwrap();
        assert!(first.pushed >= 20, "{mode}: {first:?}");
        let per_call_probes = env
            .sims
            .bitrix24
            .requests()
            .iter()
            .flat_map(|r| r.commands.clone())
            .filter(|c| c == "voximplant.statistic.get" || c == "crm.activity.list")
            .count();
        assert!(
            per_call_probes <= 5,
            "{mode}: a fresh install over an empty portal lists, it does not look each of {} calls up: {per_call_probes}",
            first.pushed
        );
        assert_no_duplicates(&env, mode);
    }
}
