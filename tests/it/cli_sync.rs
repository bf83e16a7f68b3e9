//! `sync`, `status`, `retry` and `demo` through the real binary (system clock, real HTTP).

use chrono::{Duration, NaiveDateTime};
use ubsync::clock::Clock;
use ubsync::sim::scenario::{CrmKind, Scenario};
use ubsync::sim::Bitrix24SimConfig;

use crate::harness::{text, TestEnv, ONE_TASK_EACH};

const KYIV: chrono_tz::Tz = chrono_tz::Europe::Kyiv;

/// Yesterday in Kyiv: every call of that day has ended, whatever time CI runs.
pub(crate) fn yesterday() -> chrono::NaiveDate {
    (Clock::system().now().with_timezone(&KYIV) - Duration::days(1)).date_naive()
}

fn at(hms: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(&format!("{} {hms}", yesterday()), "%Y-%m-%d %H:%M:%S").unwrap()
}

pub(crate) fn scenario() -> Scenario {
    let mut s = Scenario::empty(KYIV)
        .with_operator(10, "101")
        .with_operator(11, "102")
        .with_client(CrmKind::Contact, 797, "+380501112233", 11);
    s.add_call(
        at("10:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "ANSWER",
        60,
        Some("https://rec/1.mp3"),
    );
    s.add_call(
        at("10:05:00"),
        "IN",
        "380671234567",
        &["102"],
        "NOANSWER",
        0,
        None,
    );
    s.add_call(
        at("11:00:00"),
        "OUT",
        "102",
        &["0501112233"],
        "BUSY",
        0,
        None,
    );
    s
}

pub(crate) async fn env(s: Scenario) -> TestEnv {
    let env = TestEnv::with(s, Bitrix24SimConfig::default(), Clock::system()).await;
    env.write_config(
        "telephony",
        &format!("[sync]\nstart = \"{}\"\n", yesterday()),
    );
    let (_, refresh) = env.sims.bitrix24.install_app(1);
    let out = env.ubsync(&["auth", "set-refresh-token", &refresh]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_whole_pipeline_and_passes_its_checks() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .arg("demo")
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("demo passed"), "{t}");
    assert!(t.contains("exactly once") && !t.contains("FAIL"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_dry_run_prints_the_plan_and_writes_nothing() {
    let env = env(scenario()).await;
    let out = env.ubsync(&["sync", "--dry-run"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("telephony.externalCall.register?")
            && t.contains("EXTERNAL_CALL_ID=unitalk-1001"),
        "{t}"
    );
    // The recording goes in finish itself (sync.record_url_on_finish, the default).
    assert!(
        t.contains("telephony.externalCall.finish?") && t.contains("RECORD_URL="),
        "{t}"
    );
    assert!(!t.contains("telephony.externalCall.attachRecord"), "{t}");
    assert!(
        t.contains("tasks.task.add") && t.contains("Missed call from +380671234567"),
        "{t}"
    );
    assert!(t.contains("nothing written to Bitrix24"), "{t}");
    assert!(env.sims.bitrix24.calls().is_empty() && env.sims.bitrix24.tasks().is_empty());
    let writes = env
        .sims
        .bitrix24
        .requests()
        .iter()
        .flat_map(|r| r.commands.clone())
        .filter(|c| {
            !(c.starts_with("user.get")
                || c.ends_with(".list")
                || c.starts_with("voximplant.statistic.get"))
        })
        .count();
    assert_eq!(writes, 0, "only reads");
    let status = env.ubsync(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        v["cursor"],
        serde_json::Value::Null,
        "the real state is untouched"
    );
    assert_eq!(v["stages"], serde_json::json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pushes_prints_a_summary_and_status_reports_the_state() {
    let env = env(scenario()).await;
    let out = env.ubsync(&["sync"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("sync: pulled 3 calls (3 new, 0 changed, 0 unchanged)")
            && t.contains("pushed 3")
            && t.contains("tasks 1"),
        "{t}"
    );
    assert_eq!(env.sims.bitrix24.stats().len(), 3);

    let again = env.ubsync(&["sync"]).await;
    assert!(
        text(&again).contains("pushed 0") && text(&again).contains(" 0 Bitrix24 requests"),
        "{}",
        text(&again)
    );

    let status = env.ubsync(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["stages"]["done"], 3, "{v}");
    assert!(v["cursor"].is_string());
    assert_eq!(v["last_pass"]["outcome"], "ok");
    assert_eq!(v["inner_lines"].as_array().unwrap().len(), 2);
    assert_eq!(v["last_runs"]["sync"]["outcome"], "ok", "{v}");
    // Call 1001 had its link at once; the busy and missed calls expect none.
    assert_eq!(v["follow_ups"]["recordings_awaiting"], 0, "{v}");
    assert_eq!(v["follow_ups"]["recording_watch"]["not_expected"], 2, "{v}");
    assert!(v["follow_ups"]["last_long_call_sweep"].is_string(), "{v}");
    let human = env.ubsync(&["status"]).await;
    assert!(
        text(&human).contains("calls       done 3")
            && text(&human).contains("follow-ups  0 calls awaiting a recording"),
        "{}",
        text(&human)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_tells_one_calls_story_and_runs_lists_the_run_log() {
    let env = env(scenario()).await;
    assert_eq!(env.ubsync(&["sync"]).await.status.code(), Some(0));

    // By Unitalk id: the missed call, its task and the times in Kyiv's zone.
    let out = env.ubsync(&["show", "1002"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("EXTERNAL_CALL_ID unitalk-1002"), "{t}");
    assert!(t.contains("stage") && t.contains("done"), "{t}");
    assert!(t.contains("task "), "the missed call's task id: {t}");
    assert!(
        t.contains("+02:00") || t.contains("+03:00"),
        "local times with the offset: {t}"
    );
    // By EXTERNAL_CALL_ID, as JSON.
    let out = env.ubsync(&["show", "unitalk-1001", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["call_id"], "1001", "{v}");
    assert!(v[0]["bitrix24"]["call_id"].is_string(), "{v}");
    assert_eq!(v[0]["stage"], "done");
    assert!(
        v[0]["started_at"].as_str().unwrap().ends_with('Z'),
        "UTC in JSON: {v}"
    );
    // By phone number, in any of its forms: both calls with 0501112233.
    let out = env.ubsync(&["show", "+380 50 111 22 33", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["1003", "1001"], "newest first: {v}");
    // Nothing matches: a message that says what to give, exit 1.
    let out = env.ubsync(&["show", "999999"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("EXTERNAL_CALL_ID"), "{}", text(&out));

    assert_eq!(env.ubsync(&["sync"]).await.status.code(), Some(0));
    let out = env.ubsync(&["runs", "--kind", "sync", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v.as_array().unwrap();
    assert_eq!(runs.len(), 2, "{v}");
    assert!(
        runs[0]["id"].as_i64() > runs[1]["id"].as_i64(),
        "newest first"
    );
    assert_eq!(runs[1]["summary"]["pushed"], 3, "{v}");
    let human = env.ubsync(&["runs"]).await;
    let t = text(&human);
    assert!(
        t.contains("sync") && t.contains("pushed 3") && t.contains("ok"),
        "{t}"
    );
    let none = env.ubsync(&["runs", "--kind", "reconcile"]).await;
    assert!(text(&none).contains("no runs"), "{}", text(&none));
}

/// The scenario plus an answered call on inner line 109, which no Bitrix24 user has, and no
/// default user: the call can only be quarantined. Returns its id.
async fn env_with_a_call_nobody_takes() -> (TestEnv, u64) {
    let mut s = scenario();
    let stuck = s.add_call(
        at("12:00:00"),
        "IN",
        "380501112233",
        &["109"],
        "ANSWER",
        5,
        None,
    );
    let env = env(s).await;
    env.edit_config(|t| t.replace("default_user_id = 1\n", ""));
    (env, stuck)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_releases_a_quarantined_call_once_its_cause_is_fixed() {
    let (env, stuck) = env_with_a_call_nobody_takes().await;
    let out = env.ubsync(&["sync"]).await;
    assert!(text(&out).contains("quarantined 1"), "{}", text(&out));
    let status = env.ubsync(&["status"]).await;
    assert!(
        text(&status).contains(&format!("call {stuck}"))
            && text(&status).contains("inner line 109"),
        "{}",
        text(&status)
    );

    // Still no user for line 109: retry reports it is still quarantined.
    let out = env.ubsync(&["retry", &stuck.to_string()]).await;
    assert!(text(&out).contains("still quarantined"), "{}", text(&out));

    env.sims
        .bitrix24
        .add_user(ubsync::sim::bitrix24::PortalUser {
            id: 12,
            name: "New".into(),
            last_name: "Operator".into(),
            email: "n@example.com".into(),
            inner: Some("109".into()),
            active: true,
        });
    let out = env.ubsync(&["retry", "--all"]).await;
    assert!(text(&out).contains("pushed 1"), "{}", text(&out));
    assert!(env
        .sims
        .bitrix24
        .stats()
        .iter()
        .any(|r| r.external_call_id == Some(format!("unitalk-{stuck}")) && r.portal_user_id == 12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_pass_abandons_the_request_in_flight_and_the_next_pass_finishes_cleanly() {
    let s = scenario();
    let env = env(s.clone()).await;
    // The portal executes the batch but answers only after 30 s.
    env.sims.bitrix24.inject(ubsync::sim::Fault::once(
        Some("telephony.externalCall.register"),
        ubsync::sim::FaultKind::Slow(std::time::Duration::from_secs(30)),
    ));
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .arg("--config")
        .arg(env.dir.path().join("ubsync.toml"))
        .arg("sync")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait (bounded) until the batch has reached the portal.
    for _ in 0..500 {
        if env
            .sims
            .bitrix24
            .requests()
            .iter()
            .any(|r| r.method == "batch" && r.commands.iter().any(|c| c.ends_with("register")))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let sent = std::time::Instant::now();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().await.unwrap();
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(5),
        "exits within seconds, not after the 30 s answer"
    );
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(text(&out).contains("interrupted"), "{}", text(&out));

    let status = env.ubsync(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["last_pass"]["outcome"], "interrupted");
    assert!(
        v["stages"]["in_flight"].as_i64().unwrap_or(0) > 0,
        "what is known is recorded: {v}"
    );

    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stats = env.sims.bitrix24.stats();
    assert_eq!(stats.len(), 3, "each call exactly once");
    let mut ids: Vec<_> = stats.iter().map(|r| r.external_call_id.clone()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    assert_eq!(env.sims.bitrix24.tasks().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_state_exits_75_naming_the_holder() {
    let env = env(scenario()).await;
    let db = env.dir.path().join("state/ubsync.db");
    let held = ubsync::lock::StateLock::acquire(&db).unwrap();
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("PID {}", std::process::id())),
        "{}",
        text(&out)
    );
    assert!(env.sims.bitrix24.calls().is_empty(), "it did nothing");
    drop(held);
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_prints_plain_progress_when_not_on_a_terminal_and_completes() {
    let env = env(scenario()).await;
    let day = yesterday().to_string();
    let out = env
        .ubsync(&["backfill", "--from", &day, "--to", &day])
        .await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains("backfill: about 3 calls in the range (0 already done)")
            && t.contains("backfill: 0/3 calls done")
            && t.contains("backfill: 3/3 calls done")
            && t.contains("calls/s")
            && t.contains("ETA"),
        "{t}"
    );
    assert!(t.contains("backfill: complete"), "{t}");
    assert_eq!(env.sims.bitrix24.stats().len(), 3);
    let again = env
        .ubsync(&["backfill", "--from", &day, "--to", &day])
        .await;
    assert!(text(&again).contains("pushed 0"), "{}", text(&again));
    let bad = env
        .ubsync(&["backfill", "--from", "soon", "--to", &day])
        .await;
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_missing_duplicated_and_ledger_only_calls_and_lost_tasks_and_repairs_all_but_duplicates(
) {
    let env = env(scenario()).await;
    // One task per missed call (the client rules are tested on their own).
    env.write_config(
        "telephony",
        &format!("[sync]\nstart = \"{}\"\n{ONE_TASK_EACH}", yesterday()),
    );
    assert_eq!(env.ubsync(&["sync"]).await.status.code(), Some(0));
    // A call Unitalk lists late (sync's windows passed it long ago).
    let late = 5000;
    let mut extra = Scenario::empty(KYIV);
    let id = extra.add_call(
        at("09:00:00"),
        "IN",
        "380501112233",
        &["101"],
        "NOANSWER",
        0,
        None,
    );
    let mut call = extra.calls.pop().unwrap();
    call.id = late;
    let _ = id;
    env.sims.unitalk.add_calls([call]);
    // The portal lost one call, lost the missed-call task, and holds another call twice.
    env.sims.bitrix24.forget_call("unitalk-1001");
    let task = env.sims.bitrix24.tasks()[0].id;
    env.sims.bitrix24.forget_task(task);
    env.sims.bitrix24.duplicate_call("unitalk-1003");

    let day = yesterday().to_string();
    let dry = env
        .ubsync(&["reconcile", "--from", &day, "--dry-run"])
        .await;
    let t = text(&dry);
    assert_eq!(dry.status.code(), Some(3), "differences not repaired: {t}");
    // Columns are aligned by the table crate; compare with the spacing squashed.
    let flat = t.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("missing from Bitrix24 2 1001 5000"), "{t}");
    assert!(flat.contains("ledger only (lost in B24) 1 1001"), "{t}");
    assert!(flat.contains("duplicated in Bitrix24 1 1003×2"), "{t}");
    assert!(flat.contains("missed-call tasks missing 1 1002"), "{t}");
    assert!(t.contains("run without --dry-run"), "{t}");
    assert_eq!(
        env.sims.bitrix24.stats().len(),
        3,
        "a dry run writes nothing"
    );
    let reports: Vec<_> = std::fs::read_dir(env.dir.path().join("state/reports"))
        .unwrap()
        .collect();
    assert_eq!(reports.len(), 1);

    let fix = env.ubsync(&["reconcile", "--from", &day]).await;
    let t = text(&fix);
    assert_eq!(
        fix.status.code(),
        Some(3),
        "duplicates remain for a human: {t}"
    );
    assert!(t.contains("duplicates need a human"), "{t}");
    let stats = env.sims.bitrix24.stats();
    for id in ["1001", "1002", "5000"] {
        assert_eq!(
            stats
                .iter()
                .filter(|r| r.external_call_id == Some(format!("unitalk-{id}")))
                .count(),
            1,
            "{id}"
        );
    }
    assert_eq!(
        stats
            .iter()
            .filter(|r| r.external_call_id.as_deref() == Some("unitalk-1003"))
            .count(),
        2,
        "never deleted"
    );
    assert_eq!(
        env.sims.bitrix24.tasks().len(),
        2,
        "1002's task again, and 5000's"
    );

    let after = env
        .ubsync(&["reconcile", "--from", &day, "--dry-run"])
        .await;
    let t = text(&after);
    let flat = t.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains("missing from Bitrix24 0") && flat.contains("missed-call tasks missing 0"),
        "{t}"
    );
}

async fn get(env: &TestEnv, url: &str) -> (u16, String) {
    let r = env.http.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Waits (bounded, polling) until `f` holds.
pub(crate) async fn eventually<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(
    mut f: F,
) -> bool {
    for _ in 0..200 {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

pub(crate) async fn start_daemon(env: &TestEnv) -> (tokio::process::Child, String) {
    start_daemon_on(env, "127.0.0.1:0").await
}

/// The daemon on `listen` (tests that must name the address in the config first pick a free
/// port and pass it here).
pub(crate) async fn start_daemon_on(
    env: &TestEnv,
    listen: &str,
) -> (tokio::process::Child, String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .arg("--config")
        .arg(env.dir.path().join("ubsync.toml"))
        .args(["run", "--listen", listen])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next_line()
        .await
        .unwrap()
        .unwrap();
    let base = line.split_whitespace().nth(2).unwrap().to_string();
    (child, base)
}

fn fast_schedule(env: &TestEnv, health: &str) {
    std::fs::write(
        env.dir.path().join("fast.toml"),
        "timezone = \"Europe/Kyiv\"\n[[job]]\nname = \"sync\"\ncron = \"* * * * * *\"\n[[job]]\nname = \"lines\"\ncron = \"*/2 * * * * *\"\n[[job]]\nname = \"reconcile\"\ncron = \"0 30 3 * * *\"\n",
    )
    .unwrap();
    env.edit_config(|t| {
        format!("{t}\n[schedule]\nfile = \"fast.toml\"\n[health]\nmax_age = \"{health}\"\n")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_its_schedule_serves_health_and_metrics_holds_the_lock_and_stops_on_sigterm(
) {
    let env = env(scenario()).await;
    fast_schedule(&env, "10m");
    let (child, base) = start_daemon(&env).await;
    assert!(
        eventually(|| async {
            env.sims.bitrix24.stats().len() == 3
                && get(&env, &format!("{base}/metrics"))
                    .await
                    .1
                    .contains("ubsync_passes_total{job=\"sync\"} 2")
        })
        .await,
        "two sync passes ran"
    );
    let (code, body) = get(&env, &format!("{base}/healthz")).await;
    assert_eq!(code, 200, "{body}");
    let (_, m) = get(&env, &format!("{base}/metrics")).await;
    for needle in [
        "ubsync_calls_pushed_total 3",
        "ubsync_tasks_created_total 1",
        "ubsync_cursor_lag_seconds",
        "ubsync_recordings_unproven 0",
        "ubsync_last_success_timestamp_seconds{job=\"sync\"}",
        "ubsync_bitrix24_requests_total",
        "ubsync_unitalk_request_units_total",
        "ubsync_passes_total{job=\"lines\"}",
        "ubsync_failures_total{job=\"reconcile\"} 0",
        "ubsync_build_info{version=",
    ] {
        assert!(m.contains(needle), "{needle} missing from:\n{m}");
    }
    // GET /status: what `status --json` prints.
    let (code, body) = get(&env, &format!("{base}/status")).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["last_runs"]["sync"]["outcome"], "ok", "{v}");
    assert_eq!(v["stages"]["done"], 3, "{v}");
    // A timer-started sync meanwhile is refused: one writer at a time.
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("PID {}", child.id().unwrap())),
        "{}",
        text(&out)
    );

    let sent = std::time::Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().await.unwrap();
    assert!(sent.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.sims.bitrix24.stats().len(), 3, "never twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_with_the_reason_when_passes_keep_failing() {
    let env = env(scenario()).await;
    fast_schedule(&env, "1s");
    env.sims.unitalk.set_api_key("rotated-key");
    let (mut child, base) = start_daemon(&env).await;
    assert!(
        eventually(|| async {
            let (code, body) = get(&env, &format!("{base}/healthz")).await;
            code == 503
                && body.contains("no sync pass has succeeded")
                && body.contains("Authorization invalid")
        })
        .await,
        "{:?}",
        get(&env, &format!("{base}/healthz")).await
    );
    let (_, m) = get(&env, &format!("{base}/metrics")).await;
    assert!(m.contains("ubsync_failures_total{job=\"sync\"}"), "{m}");
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_plans_each_command_once_matches_the_real_pass_and_keeps_a_refreshed_token() {
    let env = env(scenario()).await;
    // The stored access token has expired: the dry run must refresh and keep the new pair.
    env.sims.bitrix24.expire_access_tokens();
    let db = env.dir.path().join("state/ubsync.db");
    let out = env.ubsync(&["sync", "--dry-run"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let planned: Vec<&str> = t.lines().filter(|l| l.starts_with("call ")).collect();
    let unique: std::collections::HashSet<&&str> = planned.iter().collect();
    assert_eq!(unique.len(), planned.len(), "each command once:\n{t}");
    // The real pass afterwards works: the dry run did not throw the refreshed pair away.
    let before = env.sims.bitrix24.requests().len();
    let real = env.ubsync(&["sync"]).await;
    assert_eq!(real.status.code(), Some(0), "{}", text(&real));
    let sent = env.sims.bitrix24.requests()[before..]
        .iter()
        .flat_map(|r| r.commands.clone())
        .filter(|c| {
            !c.starts_with("user.get")
                && !c.contains(".list")
                && !c.contains("statistic")
                && !c.contains("search")
        })
        .count();
    let real_commands: Vec<String> = env.sims.bitrix24.requests()[before..]
        .iter()
        .flat_map(|r| r.commands.clone())
        .collect();
    assert_eq!(
        sent,
        planned.len(),
        "the plan's totals match what a real pass sends:\n{t}\nsent: {real_commands:?}"
    );
    // And a second dry run on an up-to-date store changes nothing in the file.
    let bytes = std::fs::read(&db).unwrap();
    let again = env.ubsync(&["sync", "--dry-run"]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert_eq!(
        std::fs::read(&db).unwrap(),
        bytes,
        "the store file is byte-identical"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_identity_field_of_a_used_state_file_is_refused() {
    let env = env(scenario()).await;
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    env.edit_config(|t| t.replace("[unitalk]\n", "[unitalk]\ncall_id_field = \"dbid\"\n"));
    let before = env.sims.bitrix24.calls().len();
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("keyed by `id`"), "{}", text(&out));
    assert_eq!(
        env.sims.bitrix24.calls().len(),
        before,
        "nothing pushed again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_never_repairs_on_an_incomplete_listing() {
    use ubsync::sim::{Fault, FaultKind};
    let env = env(scenario()).await;
    let out = env.ubsync(&["sync"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let day = yesterday().to_string();
    let before = env.sims.bitrix24.stats().len();
    // Every listing request fails with a 429: Bitrix24's side of the range is unknown.
    env.sims.bitrix24.inject(Fault::times(
        Some("voximplant.statistic.get"),
        FaultKind::OperationLimit,
        50,
    ));
    let out = env.ubsync(&["reconcile", "--from", &day]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(t.contains("unknown"), "{t}");
    assert_eq!(
        env.sims.bitrix24.stats().len(),
        before,
        "nothing registered again: {t}"
    );
    assert_eq!(env.sims.bitrix24.calls().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_keeps_working_and_stops_on_sigterm_when_its_stderr_and_stdout_are_gone() {
    let env = env(scenario()).await;
    fast_schedule(&env, "10m");
    let (mut child, base) = start_daemon(&env).await;
    // `ubsync run 2>&1 | tee log` and tee dies: both pipes are closed.
    drop(child.stderr.take());
    drop(child.stdout.take());
    assert!(
        eventually(|| async { env.sims.bitrix24.stats().len() == 3 }).await,
        "passes go on with nowhere to log"
    );
    let (code, _) = get(&env, &format!("{base}/healthz")).await;
    assert_eq!(code, 200);
    let sent = std::time::Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = child.wait().await.unwrap();
    assert!(sent.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_lists_the_calls_it_would_quarantine_and_quarantines_none() {
    let (env, stuck) = env_with_a_call_nobody_takes().await;
    // A first dry run creates the store; the second must leave it byte-identical.
    let first = env.ubsync(&["sync", "--dry-run"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let db = env.dir.path().join("state/ubsync.db");
    let bytes = std::fs::read(&db).unwrap();
    let out = env.ubsync(&["sync", "--dry-run"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!("call {stuck}: would be quarantined, nothing sent"))
            && t.contains("inner line 109"),
        "{t}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        bytes,
        "the store file is byte-identical"
    );
    let status = env.ubsync(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["quarantined"], serde_json::json!([]), "{v}");
    // The real pass quarantines it.
    let out = env.ubsync(&["sync"]).await;
    assert!(text(&out).contains("quarantined 1"), "{}", text(&out));
}
