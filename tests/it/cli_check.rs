//! `ubsync check` through the real binary: verdicts per upstream and exit codes.

use crate::harness::{text, TestEnv};
use ubsync::sim::Scenario;

fn scenario() -> Scenario {
    Scenario::empty(chrono_tz::Europe::Kyiv).with_operator(10, "101")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_offline_validates_config_and_store_without_network() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "");
    let out = env.ubsync(&["check", "--offline"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("config    ok"), "{t}");
    assert!(t.contains("schema v12"), "{t}");
    // No schedule file beside the config: the daemon would run the built-in schedule.
    assert!(
        t.contains("schedule  ok") && t.contains("built in: 3 jobs"),
        "{t}"
    );
    assert!(t.contains("skipped"), "{t}");
    assert!(env.dir.path().join("state/ubsync.db").exists());
    assert!(
        !t.contains(ubsync::sim::bitrix24::DEFAULT_WEBHOOK_CODE),
        "webhook code leaked: {t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_in_activity_mode_authenticates_both_upstreams() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "");
    let out = env.ubsync(&["check"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("unitalk   ok"), "{t}");
    assert!(
        t.contains("bitrix24  ok") && t.contains("incoming webhook authenticated as user 1"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_in_telephony_mode_needs_tokens_then_works_after_set_refresh_token() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("telephony", "");
    let out = env.ubsync(&["check"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("set-refresh-token"), "{}", text(&out));

    let (_, refresh) = env.sims.bitrix24.install_app(1);
    let out = env.ubsync(&["auth", "set-refresh-token", &refresh]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !env.sims.bitrix24.refresh_token_valid(&refresh),
        "the used refresh token must be rotated away"
    );
    assert!(!text(&out).contains(&refresh), "token leaked");
    // The README's bootstrap run again with the same (now used) token: nothing to do, exit 0.
    let again = env.ubsync(&["auth", "set-refresh-token", &refresh]).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        text(&again).contains("already exchanged by this install"),
        "{}",
        text(&again)
    );
    // A token the portal refuses (mistyped, revoked) is an error an admin must see, and the
    // stored pair is kept.
    let garbage = env
        .ubsync(&["auth", "set-refresh-token", "0123456789abcdefgarbage"])
        .await;
    let g = text(&garbage);
    assert_eq!(garbage.status.code(), Some(2), "{g}");
    assert!(
        g.contains("refused this refresh token") && g.contains("still work"),
        "{g}"
    );

    let out = env.ubsync(&["check"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("OAuth application authenticated as user 1"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_unitalk_key_is_a_configuration_error() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "");
    env.sims.unitalk.set_api_key("another-key");
    let out = env.ubsync(&["check"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("Authorization invalid"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_portal_exits_75_so_a_timer_retries() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "");
    env.sims.bitrix24.set_bucket_level(50.0);
    let out = env.ubsync(&["check"]).await;
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(
        text(&out).contains("QUERY_LIMIT_EXCEEDED"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_exits_2_and_names_the_key() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "[tasks]\ndeadline_minutes = -5\n");
    let out = env.ubsync(&["check", "--offline"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("tasks.deadline_minutes"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let env = TestEnv::start(scenario()).await;
    let out = env.ubsync(&["no-such-command"]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_serve_stores_the_tokens_of_the_install_callback_and_refuses_other_portals() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let env = TestEnv::start(scenario()).await;
    env.write_config("telephony", "");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ubsync"))
        .arg("--config")
        .arg(env.dir.path().join("ubsync.toml"))
        .args(["auth", "serve", "--listen", "127.0.0.1:0", "--once"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let url = first.split_whitespace().nth(2).unwrap().to_string();
    assert!(url.ends_with("/install"), "{first}");

    // Another portal's callback is refused and stores nothing.
    let other = env
        .sims
        .bitrix24
        .install_callback_body(1)
        .replace("127.0.0.1", "evil.example");
    let r = env
        .http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("evil.example"));

    let body = env.sims.bitrix24.install_callback_body(1);
    let r = env
        .http
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let status = child.wait().await.unwrap();
    assert!(status.success());
    let out = env.ubsync(&["check"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("OAuth application authenticated"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_inner_line_statuses_separately_and_does_not_fail_on_them() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "");
    env.sims.unitalk.inject(
        Some("/phones/inner"),
        ubsync::sim::unitalk::UnitalkFault::Error("Authorization failed".into()),
    );
    let out = env.ubsync(&["check"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("inner-line statuses: unavailable"), "{t}");
    let out = env.ubsync(&["check"]).await;
    assert!(
        text(&out).contains("inner-line statuses: 1 lines"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_validates_the_schedule_the_daemon_would_use() {
    let env = TestEnv::start(scenario()).await;
    env.write_config("activity", "[schedule]\nfile = \"missing.toml\"\n");
    let out = env.ubsync(&["check", "--offline"]).await;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("schedule  FAIL") && t.contains("schedule.file"),
        "{t}"
    );
    std::fs::write(
        env.dir.path().join("missing.toml"),
        "timezone = \"Europe/Kyiv\"\n[[job]]\nname = \"sync\"\ncron = \"not a cron\"\n",
    )
    .unwrap();
    let out = env.ubsync(&["check", "--offline"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("schedule  FAIL"), "{}", text(&out));
}
